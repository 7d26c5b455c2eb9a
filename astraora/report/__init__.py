"""Reports from run directories: hybrid runs compared with their digital baselines."""

from astraora.report.compare import compare, find_run_dirs, load_run, main, markdown_table, write_csv

__all__ = ["compare", "find_run_dirs", "load_run", "main", "markdown_table", "write_csv"]
