"""Turn one `Comparison` into files people and programs can read, one folder per pair.

`report.html` (one self-contained page), `result.json`, `regions.csv`, `change_map.nii.gz` and
`flagged_mask.nii.gz` (follow-up's own grid), `registered.nii.gz` (follow-up on the baseline grid),
`transform.tfm` (baseline -> follow-up points), `qc.json` and, last, `.complete`.

Modules: `outputs` (the writer registry, `write_outputs`, checks and `.complete`), `result` (result.json's
document), `figures` (matplotlib pictures), `page` (jinja2 pages), `wording` (numbers in words), `deid`
(pseudonyms, scrubbing), `summary` (a batch's summary.csv / summary.html), `context`, `settings`.
"""

from .context import OutputContext
from .deid import HIDDEN, identifiers, pseudonym, scrub
from .figures import figure_data_uri, new_figure
from .outputs import COMPLETE, WRITERS, OutputError, OutputWriter, check_file, is_complete, write_outputs
from .result import FILES as OUTPUT_FILES
from .result import jsonable, ordered_regions, result_document
from .settings import ReportSettings

__all__ = ["COMPLETE", "HIDDEN", "OUTPUT_FILES", "WRITERS", "OutputContext", "OutputError", "OutputWriter",
           "ReportSettings", "check_file", "figure_data_uri", "identifiers", "is_complete", "jsonable",
           "new_figure", "ordered_regions", "pseudonym", "result_document", "scrub", "write_outputs"]
