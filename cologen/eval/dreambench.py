"""DreamBench (customized generation): DINO and CLIP-I of the output to the subject reference,
CLIP-T of the output to the prompt.

Sample keys: ``reference`` (the subject's reference image), ``prompt`` (given to ``generate``),
optional ``clip_prompt`` (the text CLIP-T scores against; DreamBench scores the prompt with the
subject's class noun in place of the identifier, e.g. "a dog on the beach"; defaults to
``prompt``), optional ``key``.
"""

from __future__ import annotations

import numpy as np

from cologen.eval.loop import ClipDinoScorer, Sample
from cologen.metrics.similarity import clip_image_score, clip_text_score, dino_score


class DreamBenchScorer(ClipDinoScorer):

    def score(self, samples: list[Sample], outputs: list[np.ndarray]) -> list[dict[str, float]]:
        refs = [s["reference"] for s in samples]
        texts = [str(s.get("clip_prompt", s["prompt"])) for s in samples]
        dino = dino_score(outputs, refs, self.dino)
        clip_i = clip_image_score(outputs, refs, self.clip)
        clip_t = clip_text_score(outputs, texts, self.clip)
        return [
            {"dino": float(d), "clip_i": float(ci), "clip_t": float(ct)}
            for d, ci, ct in zip(dino, clip_i, clip_t)
        ]
