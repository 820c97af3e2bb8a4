"""Parity testing, torch-free (numpy; onnxruntime through the runtime's backends): one library for
the exporter's checks at export time and for ``anchorflow verify`` on any install.

- :mod:`.stats`: the tolerance table (one per precision), error statistics, ``compare``;
- :mod:`.cases`: inputs built from a network's declared inputs (any condition), random and real;
- :mod:`.report`: per-network reports over cases, the worst case, a text table;
- :mod:`.verify`: every backend x precision of a bundle against a reference backend, per network
  and end to end.
"""

from .cases import Case, Domain, RealData, make_cases  # noqa: F401
from .report import NetworkReport, format_table, reference_outputs, report_rows, run_report  # noqa: F401
from .stats import TOLERANCES, ErrorStats, Tolerance, compare, tolerance  # noqa: F401
