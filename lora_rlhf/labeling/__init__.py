"""Collect human rankings of candidate responses (the paper's step 2 data), in a browser or a terminal.

Reads a Candidates JSONL (one prompt + K responses per line) and appends one Rankings line per judgement
(docs/FORMATS.md). Appends are atomic and locked, so labelers can stop, resume and work side by side.
"""

from lora_rlhf.labeling.candidates import load_candidates
from lora_rlhf.labeling.judgement import FLAG_LABELS, parse_order
from lora_rlhf.labeling.session import LabelSession
from lora_rlhf.labeling.store import RankingStore

__all__ = ["FLAG_LABELS", "LabelSession", "RankingStore", "load_candidates", "parse_order"]
