"""What a labeler sees next and what a submission writes: candidates + the rankings store, shared by the web
page and the terminal mode so both behave identically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_rlhf.errors import DataError
from lora_rlhf.labeling.candidates import load_candidates
from lora_rlhf.labeling.judgement import check_flags, check_labeler, dense_ranks, make_record
from lora_rlhf.labeling.store import RankingStore


class LabelSession:
    """Items are offered in file order; each labeler sees every item once (skips count as done)."""

    def __init__(self, candidates: list[dict[str, Any]], store: RankingStore):
        self.items = candidates
        self.by_id = {str(c["id"]): c for c in candidates}
        self.store = store

    @classmethod
    def open(cls, candidates_path: str | Path, out_path: str | Path) -> LabelSession:
        """Validate both paths fully before anything is written."""
        return cls(load_candidates(candidates_path), RankingStore(out_path))

    def progress(self, labeler: str) -> dict[str, int]:
        done = self.store.done_ids(labeler) & self.by_id.keys()
        return {"done": len(done), "total": len(self.items)}

    def next_item(self, labeler: str) -> dict[str, Any]:
        """{"item": {id, prompt, responses} or None when finished, "progress": {done, total}}."""
        check_labeler(labeler)
        done = self.store.done_ids(labeler)
        pending = [c for c in self.items if str(c["id"]) not in done]
        item = None
        if pending:
            c = pending[0]
            item = {"id": c["id"], "prompt": c["prompt"], "responses": c["responses"]}
        return {"item": item, "progress": {"done": len(self.items) - len(pending), "total": len(self.items)}}

    def submit(self, labeler: str, item_id: Any, ranks: Any = None, flags: Any = None,
               skipped: bool = False) -> bool:
        """Validate and append one judgement. False when this labeler had already judged the item."""
        check_labeler(labeler)
        candidate = self.by_id.get(str(item_id))
        if candidate is None:
            raise DataError(f"no prompt with id {item_id!r} in the candidates file", fix="reload the page")
        k = len(candidate["responses"])
        flags = check_flags(flags, k)
        ranks = None if skipped else dense_ranks(ranks, k)
        return self.store.append(make_record(candidate, labeler, ranks, flags, skipped=bool(skipped)))
