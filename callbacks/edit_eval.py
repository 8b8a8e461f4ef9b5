"""The edit-evaluation callback every editing method reports through.

Before each batch of requests is edited it records the pre-edit scores and the pre-edit
top-1 predictions on the locality prompts; after the edit it scores the same requests
(both protocols, each number named by its protocol), logs them to the trainer's loggers,
and keeps the per-case results (rewritten to ``edit_results.json`` after every batch, marked
``"partial": true``, so a resumed run keeps the scores of the batches edited before). At the end it logs the means, and, for a sequential run,
scores every request again on the final model (what survives later edits), writes
``edit_results.json`` into the run folder (atomically) and a PNG of the running efficacy.

Locality measures locality: a neighbourhood prompt about a subject that is itself edited (same relation)
in the same call or earlier in a sequential run is meant to change, so it is left out of neighbourhood
and token-accuracy locality, and counted (``edit/neighbour_prompts_left_out``); see
``lethe.streams``.

Streams (``stream_every: k``, sequential runs): every k edits, all edits so far are scored again
(efficacy, paraphrase, neighbourhood) together with general ability (``general: world`` = greedy recall
of world facts whose subjects no edit of the stream touches, ``general_paraphrase`` the same facts at their
held-out phrasings); the rows go to the loggers
(``stream/*``), to ``edit_results.json`` (``stream``) and to ``stream_curves.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from lethe import evaluation as ev
from lethe.io import write_json


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class EditEvaluation(L.Callback):
    """Args: protocols — any of "counterfact", "token_accuracy"; final — rescore all requests at the end
    of a sequential run; batch_size — scoring batch size; plot — save the running-efficacy PNG."""

    def __init__(self, protocols: Sequence[str] = ("counterfact", "token_accuracy"), final: bool = True,
                 batch_size: int = 64, plot: bool = True, stream_every: int | None = None,
                 general: str | None = None) -> None:
        unknown = set(protocols) - {ev.COUNTERFACT, ev.TOKEN_ACCURACY}
        if unknown:
            raise ValueError(f"unknown evaluation protocols {sorted(unknown)}")
        if general not in (None, "world"):
            raise ValueError(f"evaluate.general must be 'world' or null, got {general!r}")
        self.stream_every = stream_every
        self.general = general
        self.stream: list[dict] = []
        self._general_pairs: tuple | None = None  # (untouched facts, the same at held-out phrasings)
        self.protocols = list(protocols)
        self.final = final
        self.batch_size = batch_size
        self.plot = plot
        self.rows: list[dict] = []
        self.requests: list = []
        self._pre: dict = {}
        self.results: dict = {}

    def _score(self, module, requests, pre_loc=None, edited_with=None) -> dict:
        requests, left_out = ev.without_edited_neighbours(requests, edited_with)
        out = {"left_out": left_out}
        if ev.COUNTERFACT in self.protocols:
            out[ev.COUNTERFACT] = ev.counterfact_scores(module.model, module.tokenizer, module.family, requests,
                                                        batch_size=self.batch_size)
        if ev.TOKEN_ACCURACY in self.protocols:
            out[ev.TOKEN_ACCURACY] = ev.token_accuracy_scores(module.model, module.tokenizer, module.family,
                                                              requests, pre_loc, batch_size=self.batch_size)
        return out

    def _resume(self, trainer, pl_module) -> None:
        """A resumed sequential run keeps the per-case results of the batches edited before."""
        self._resumed = True
        done = getattr(pl_module, "_done_batches", 0)
        path = Path(trainer.default_root_dir) / "edit_results.json"
        if done and path.is_file():
            import json

            from lethe.edits import request_from_dict

            prev = json.loads(path.read_text())
            total = getattr(pl_module, "total", None)  # edits taken out by `lethe rollback` are no longer scored
            gone = {str(r.get("case_id")) for r in (total.meta.get("rolled_back", []) if total is not None else [])}
            kept = [i for i, r in enumerate(prev.get("cases", [])) if r["batch"] < done]
            requests = [request_from_dict(r) for r in prev.get("requests", [])]
            kept = [i for i in kept if str(prev["cases"][i]["case_id"]) not in gone]
            self.rows = [prev["cases"][i] for i in kept] + self.rows
            self.requests = [requests[i] for i in kept if i < len(requests)]
            self.stream = [r for r in prev.get("stream", []) if r["n_edits"] <= len(self.rows)]

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not getattr(self, "_resumed", False):
            self._resume(trainer, pl_module)
        if getattr(pl_module, "skip_batch", lambda i: False)(batch_idx):
            self._pre = {}
            return
        edited = self._edited_with(pl_module, batch)
        kept, _ = ev.without_edited_neighbours(batch, edited)
        self._pre = {"scores": self._score(pl_module, batch, edited_with=edited),
                     "loc": ev.locality_reference(pl_module.model, pl_module.tokenizer, pl_module.family, kept,
                                                  self.batch_size)
                     if ev.TOKEN_ACCURACY in self.protocols else None}

    def _edited_with(self, pl_module, batch) -> list:
        """The requests applied together with ``batch``: the batch, plus the stream so far when edits are kept."""
        return [*self.requests, *batch] if getattr(pl_module, "sequential", False) else list(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._pre:
            return
        post = self._score(pl_module, batch, self._pre["loc"], edited_with=self._edited_with(pl_module, batch))
        metrics = {"edit/neighbour_prompts_left_out": post.pop("left_out")}
        self._pre["scores"].pop("left_out")
        for proto, scores in post.items():
            for k, v in ev.summary(scores).items():
                metrics[f"edit/{k}"] = v
            for k, v in ev.summary(self._pre["scores"][proto]).items():
                metrics[f"pre/{k}"] = v
        for i, req in enumerate(batch):
            row = {"batch": batch_idx, "case_id": req.case_id, "subject": req.subject,
                   "target_new": req.target_new}
            for proto, scores in post.items():
                for k, v in scores.items():
                    if k.endswith("_per_case"):
                        row[f"{proto}/{k.removesuffix('_per_case')}"] = v[i]
            self.rows.append(row)
        self.requests += list(batch)
        self._pre = {}
        if self.stream_every and getattr(pl_module, "sequential", False) and \
                len(self.rows) // self.stream_every > (len(self.rows) - len(batch)) // self.stream_every:
            row = self._stream_row(trainer, pl_module)
            metrics.update({f"stream/{k}": v for k, v in row.items() if v is not None})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=len(self.rows))
        if trainer.is_global_zero:  # the scores so far, before the module saves the batch's artifact
            self._write(Path(trainer.default_root_dir), {}, partial=True)

    def _stream_row(self, trainer, pl_module) -> dict:
        import time

        from lethe import streams

        general = None
        if self.general == "world":
            if self._general_pairs is None:  # the whole stream's subjects, known from the datamodule
                stream = getattr(getattr(trainer, "datamodule", None), "requests", None) or self.requests
                self._general_pairs = (streams.untouched_world_facts(stream),
                                       streams.untouched_world_paraphrases(stream))

            def general(loaded):
                facts, paraphrases = self._general_pairs
                return {"general": streams.recall(loaded, facts),
                        "general_paraphrase": streams.recall(loaded, paraphrases)}
        t = time.perf_counter()
        row = streams.stream_row(pl_module.loaded, self.requests, general, batch_size=self.batch_size)
        row["eval_seconds"] = round(time.perf_counter() - t, 2)
        self.stream.append(row)
        return row

    def _write(self, out_dir: Path, summary: dict, partial: bool = False) -> None:
        from lethe.edits import request_to_dict

        write_json(out_dir / "edit_results.json", {"summary": summary, **({"partial": True} if partial else {}),
                                                   "cases": self.rows,
                                                   **({"stream": self.stream} if self.stream else {}),
                                                   "requests": [request_to_dict(r) for r in self.requests]})

    def on_test_end(self, trainer, pl_module) -> None:
        if not self.rows:
            return
        keys = [k for k in self.rows[0] if "/" in k]
        summary = {f"edit_mean/{k}": _mean([r.get(k) for r in self.rows]) for k in keys}
        final = {}
        if self.final and getattr(pl_module, "sequential", False) and len(self.requests) > 1:
            scores_by_proto = self._score(pl_module, self.requests)
            final["final/neighbour_prompts_left_out"] = scores_by_proto.pop("left_out")
            for scores in scores_by_proto.values():
                final.update({f"final/{k}": v for k, v in ev.summary(scores).items()})
        self.results = {**summary, **final}
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.results.items() if v is not None}, step=len(self.rows))
            logger.save()
        out_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write(out_dir, self.results)
            if self.plot:
                self._plot(out_dir / "edit_efficacy.png", trainer)
                if self.stream:
                    from lethe.streams import plot_stream

                    plot_stream({pl_module.hparams.editor: self.stream}, out_dir / "stream_curves.png",
                                title=f"{pl_module.hparams.editor} on {pl_module.model_source}")
                    for logger in trainer.loggers:
                        if type(logger).__name__ == "WandbLogger":
                            logger.log_image(key="stream_curves", images=[str(out_dir / "stream_curves.png")])

    def _plot(self, path: Path, trainer) -> None:
        key = next((k for k in ("counterfact/efficacy", "token_accuracy/efficacy_acc") if k in self.rows[0]), None)
        if key is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lethe.io import save_png

        vals = [r[key] or 0.0 for r in self.rows]
        running = [sum(vals[: i + 1]) / (i + 1) for i in range(len(vals))]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(range(1, len(vals) + 1), running, label=f"running mean {key}")
        ax.set_xlabel("requests edited")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower left")
        save_png(fig, path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="edit_efficacy", images=[str(path)])
