"""Instruction-editing benchmarks: MagicBrush test and Emu Edit test.

Against the source (both benchmarks' protocol): ``clip_i`` and ``dino`` (cosine, output vs
source), ``l1`` (mean absolute difference in [0, 1], output vs source). Against the text:
``clip_t`` (output vs the target caption) and, when the source caption is given too,
``clip_dir`` (Emu Edit's CLIP direction similarity). Against a ground-truth edited image, when
the sample has one (MagicBrush): ``l1_target``, ``clip_i_target``, ``dino_target``.

Sample keys: ``source`` (image to edit), ``prompt`` (the instruction, given to ``generate``),
optional ``caption`` (target caption), ``source_caption``, ``image`` (ground-truth edited image),
``key``. A benchmark without ground-truth edits stores the source as ``image`` and says so with
``eval: {has_target: false}`` in its record: such a sample (``eval`` at the top level, or in
``record`` / ``meta["record"]``, or a plain ``has_target: False``) gets no ground-truth metrics. The output is resized (bicubic) to the source's size for L1 when they differ.
"""

from __future__ import annotations

import numpy as np

from cologen.eval.loop import ClipDinoScorer, Sample
from cologen.metrics.images import resize, to_uint8_rgb
from cologen.metrics.pixel import l1
from cologen.metrics.similarity import clip_direction_score, clip_image_score, clip_text_score, dino_score


def has_target(sample: Sample) -> bool:
    """Whether ``image`` is a ground-truth edit (False when the record says ``eval.has_target: false``)."""
    if sample.get("image") is None or sample.get("has_target") is False:
        return False
    records = (sample, sample.get("record") or {}, (sample.get("meta") or {}).get("record") or {})
    return all((r.get("eval") or {}).get("has_target") is not False for r in records)


def _same_size(output: np.ndarray, like: np.ndarray) -> np.ndarray:
    h, w = like.shape[:2]
    return output if output.shape[:2] == (h, w) else resize(output, (w, h))


class EditingScorer(ClipDinoScorer):

    def score(self, samples: list[Sample], outputs: list[np.ndarray]) -> list[dict[str, float]]:
        sources = [to_uint8_rgb(s["source"]) for s in samples]
        rows: list[dict[str, float]] = [{} for _ in samples]
        for row, o, s in zip(rows, outputs, sources):
            row["l1"] = l1(_same_size(o, s), s)
        self._pairs(rows, outputs, sources, "")
        captioned = [i for i, s in enumerate(samples) if s.get("caption")]
        if captioned:
            outs = [outputs[i] for i in captioned]
            clip_t = clip_text_score(outs, [str(samples[i]["caption"]) for i in captioned], self.clip)
            for i, v in zip(captioned, clip_t):
                rows[i]["clip_t"] = float(v)
        both = [i for i in captioned if samples[i].get("source_caption")]
        if both:
            clip_dir = clip_direction_score(
                [sources[i] for i in both],
                [outputs[i] for i in both],
                [str(samples[i]["source_caption"]) for i in both],
                [str(samples[i]["caption"]) for i in both],
                self.clip,
            )
            for i, v in zip(both, clip_dir):
                rows[i]["clip_dir"] = float(v)
        with_target = [i for i, s in enumerate(samples) if has_target(s)]
        if with_target:
            targets = [to_uint8_rgb(samples[i]["image"]) for i in with_target]
            outs = [outputs[i] for i in with_target]
            sub = [rows[i] for i in with_target]
            for row, o, t in zip(sub, outs, targets):
                row["l1_target"] = l1(_same_size(o, t), t)
            self._pairs(sub, outs, targets, "_target")
        return rows

    def _pairs(
        self, rows: list[dict[str, float]], outputs: list[np.ndarray], refs: list[np.ndarray], suffix: str
    ) -> None:
        clip_i = clip_image_score(outputs, refs, self.clip)
        dino = dino_score(outputs, refs, self.dino)
        for row, ci, d in zip(rows, clip_i, dino):
            row["clip_i" + suffix] = float(ci)
            row["dino" + suffix] = float(d)
