"""Typed configuration of the training objective and the optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cologen.data.tasks import TASKS
from cologen.typed_config import check_choices


def check_tasks(field_name: str, tasks: list[str] | None) -> None:
    """One line naming the unknown tasks of a config's task list (None: every task)."""
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"{field_name}: unknown tasks {unknown} (known: {', '.join(TASKS)})")


@dataclass
class FlowMatchingConfig:
    """Rectified flow as FLUX: x_t = (1 - s) x0 + s noise, target noise - x0, MSE on the noisy tokens.

    logit_mean / logit_std: s = sigmoid(N(mean, std)) (logit-normal).
    resolution_shift: apply FLUX's resolution-dependent shift to s (mu from the token count).
    text_dropout / source_dropout: per-sample probability of training without the prompt / the source image
        (dropped text = zero embeddings, dropped source = zero latents; the sampler's unconditional branch uses
        the same), so classifier-free guidance works.
    guidance: value of the guidance embedding for guidance-distilled backbones (FLUX.1-dev: 1.0).
    change_weight: (ours) extra loss weight of the noisy tokens whose target differs from the source token at the
        same place (the hole of an inpainting source, a grounding overlay, an edit): per-token weight
        `1 + change_weight` there, 1 elsewhere, normalized per sample. Where most of the image is a copy of the
        source, the plain MSE spends nearly all its signal on copying. 0 is the plain objective (the paper).
    change_weight_tasks: the tasks `change_weight` applies to (None: every task). On the tiny preset it costs
        inpainting its copy fidelity outside the hole (measured 30.4 -> 24.2 dB after 400 steps at lr 1e-3).
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = False
    text_dropout: float = 0.1
    source_dropout: float = 0.1
    guidance: float = 1.0
    change_weight: float = 0.0
    change_weight_tasks: list[str] | None = None

    def __post_init__(self):
        if self.change_weight < 0:
            raise ValueError(f"flow.change_weight must be >= 0, got {self.change_weight}")
        check_tasks("flow.change_weight_tasks", self.change_weight_tasks)
        for name in ("text_dropout", "source_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"flow.{name} must be in [0, 1], got {v}")
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")


@dataclass
class VeteranConfig:
    """Routing supervision.

    rho / alpha: the paper's veteran loss `alpha * |U - rho|` (rho 1 / alpha 0 at step 0, rho 0.8 / alpha 0.5
        after); the curriculum sets them per step.
    task_weight: (ours) weight of the per-sample task routing loss, `-log p[own expert]` averaged over the PRW
        blocks, where a sample's own expert is the one of the curriculum step that introduced its task (replayed
        samples go to their veterans); 0 turns it off (the paper).
    task_balance: (ours) every task in a batch weighs the same in the task routing loss (each sample by 1 / its
        task's count in the batch) instead of every sample: with replay a new task's many samples otherwise
        outweigh a replayed task's few, and the routers' sample-independent terms (bias, timestep bias) follow them.
    skip_dropped_sources: (ours) the task routing loss leaves out the samples trained without their condition
        image (`flow.source_dropout`): with the source blanked the routers see the same input for every task but
        for the prompt, so on those samples they can only learn the batch's majority task, which pulls a replayed
        task whose prompts look like the new task's (inpainting's and control's are both scene captions) toward
        the new task's expert.
    skip_dropped_source_tasks: the tasks whose dropped-source samples `skip_dropped_sources` leaves out (None:
        every task). A task whose prompts alone name it (grounding's, editing's) keeps them: on those samples only
        the prompt can route, so they teach the routers' prompt term to tell it from tasks whose sources look alike.
    gate_weight: (ours) weight of the token-gate supervision (needs `prw.token_gate`): each routed expert's gate
        learns which tokens the output changes (target != source at the same place), so the expert leaves the
        copied ones alone; 0 turns it off.
    gate_tasks: the tasks whose gates learn the changed tokens (None: every task); the other tasks' gates learn to
        stay open everywhere. Where the source does not show what changes (an edit or an overlay named only by the
        prompt), a gate that guesses costs the task (measured: see the README).
    gate_pos_weight: the changed tokens' weight in the gate supervision; above 1 a gate opens where a change is
        likely but not certain (an instruction names a place, not the tokens an object will cover there), so the
        expert can draw it; a token its gate leaves closed stays the base's copy.
    gate_pos_weight_tasks: the tasks whose changed tokens `gate_pos_weight` weighs (None: every task).
    gate_prompt_tasks: the tasks whose curriculum step's expert has the prompt's gate terms (`prw.gate_prompt`;
        None: every step's). The other steps' experts keep them at zero, frozen: a gate that finds its region in
        the source tokens (inpainting's hole) only loses its edge to a prompt that names nothing about it.
    teacher_forcing: (ours) in training every sample goes to its own expert (the one `task_weight` names) in
        every PRW block, so an expert trains on its own task's samples only (a replayed sample never reaches the
        new expert) and the routers learn from the routing losses alone; validation and sampling route as
        learned. Needs `task_weight` > 0 (nothing else would teach the routers the task).
    """

    rho: float = 1.0
    alpha: float = 0.0
    task_weight: float = 0.0
    task_balance: bool = False
    skip_dropped_sources: bool = False
    skip_dropped_source_tasks: list[str] | None = None
    gate_weight: float = 0.0
    gate_tasks: list[str] | None = None
    gate_pos_weight: float = 1.0
    gate_pos_weight_tasks: list[str] | None = None
    gate_prompt_tasks: list[str] | None = None
    teacher_forcing: bool = False

    def __post_init__(self):
        if self.task_weight < 0:
            raise ValueError(f"veteran.task_weight must be >= 0, got {self.task_weight}")
        if self.teacher_forcing and self.task_weight <= 0:
            raise ValueError("veteran.teacher_forcing needs veteran.task_weight > 0: with every sample sent to its "
                             "own expert, only the task routing loss teaches the routers")
        if self.gate_weight < 0:
            raise ValueError(f"veteran.gate_weight must be >= 0, got {self.gate_weight}")
        if self.gate_pos_weight <= 0:
            raise ValueError(f"veteran.gate_pos_weight must be > 0, got {self.gate_pos_weight}")
        check_tasks("veteran.gate_tasks", self.gate_tasks)
        check_tasks("veteran.gate_pos_weight_tasks", self.gate_pos_weight_tasks)
        check_tasks("veteran.gate_prompt_tasks", self.gate_prompt_tasks)
        check_tasks("veteran.skip_dropped_source_tasks", self.skip_dropped_source_tasks)
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"veteran.rho must be in [0, 1], got {self.rho}")
        if self.alpha < 0:
            raise ValueError(f"veteran.alpha must be >= 0, got {self.alpha}")


@dataclass
class OptimConfig:
    """AdamW over three parameter groups: experts (lr), routers (router_lr), base (base_lr, only when the base
    trains, i.e. `make base`).

    router_lr: null uses lr / 2 (InstructMoLE's setting).
    schedule: 'constant' or 'cosine' after a linear warmup of `warmup_steps`; `total_steps` is the cosine horizon.
    router_schedule: the routers' own schedule, 'constant' or 'cosine' (null: `schedule`), e.g. experts annealed at
        each curriculum step's end while the routers keep learning at their full rate.
    eight_bit: 8-bit AdamW states from bitsandbytes (CUDA only; a clear error when it is not installed).
    """

    lr: float = 1e-4
    router_lr: float | None = None
    base_lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    router_schedule: Literal["constant", "cosine"] | None = None
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    eight_bit: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        check_choices(self, "optim")
        if "cosine" in (self.schedule, self.router_schedule) and self.total_steps <= 0:
            raise ValueError("optim.total_steps must be > 0 for the cosine schedule")
