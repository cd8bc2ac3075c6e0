"""Exporters from a finished output to trainer formats: llava, obelics, bagel, wds, hf (see docs/architecture.md)."""

from curate.export.base import ExportOptions
from curate.export.common import ExportError
from curate.export.run import FORMATS, export_output

__all__ = ["FORMATS", "ExportError", "ExportOptions", "export_output"]
