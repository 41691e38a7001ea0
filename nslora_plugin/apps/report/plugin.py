"""The built-in plugin `nslora.report` (registered when `report: true`): writes the run's
report.html once the run has ended."""

from __future__ import annotations

from pathlib import Path

from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.run import RunView


class RunReportWriter:
    @hookimpl
    def nslora_after_train(self, run: RunView, folder: Path) -> None:
        from nslora_plugin.apps.report import try_write_report

        try_write_report(folder)
