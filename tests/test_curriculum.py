"""The curriculum callback end to end: boundaries, exact resume, init from a previous stage, clear failures."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cologen.curriculum.callback import CurriculumCallback
from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
from cologen.data.datamodule import MixtureDataModule
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.training.config import OptimConfig
from cologen.training.run_checkpoint import RunCheckpoint

STEPS = [("inpainting", 2), ("grounding", 3), ("control", 2)]  # 7 optimizer steps, boundaries after 2 and 5


def spec(run_steps=None, lrs=None):
    lrs = lrs or [(1e-2, None)] * len(STEPS)
    return CurriculumSpec(
        steps=[CurriculumStep(name=t, mixture={t: 1.0}, steps=n, lr=lr, router_lr=router_lr,
                              rho=1.0 if i == 0 else 0.8, alpha=0.0 if i == 0 else 0.5)
               for i, ((t, n), (lr, router_lr)) in enumerate(zip(STEPS, lrs))],
        run_steps=run_steps)


def make_module():
    return CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                         prw=PRWConfig(num_experts=3, rank=4, alpha=8, router=RouterConfig(entry_warmup_steps=1)))


def make_data(shapeworld_dir):
    tasks = [t for t, _ in STEPS]
    return MixtureDataModule(train_shards={t: str(shapeworld_dir / t / "train-*.tar") for t in tasks},
                             mixture={"inpainting": 1.0}, batch_size=2, num_workers=0, batches_per_epoch=4,
                             shuffle_buffer=8, seed=3)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class Recorder(Callback):
    """After the curriculum callback's hooks: what trains, what data comes, and the veterans' weights."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        model = module.model
        trainable = [e for e in range(model.prw.num_experts) if any(p.requires_grad for p in model.expert_parameters(e))]
        self.rows.append({
            "step": trainer.global_step, "tasks": set(batch["task"]), "trainable": trainable,
            "routers": all(p.requires_grad for p in model.router_parameters()),
            "base_frozen": not any(p.requires_grad for p in model.base_parameters()),
            "experts": [torch.cat([p.detach().flatten() for p in model.expert_parameters(e)]).clone()
                        for e in range(model.prw.num_experts)],
            "rho_alpha": (module.veteran.rho, module.veteran.alpha)})


def fit(tmp_path, shapeworld_dir, callbacks=(), ckpt_path=None, run_steps=None, module=None, lrs=None):
    L.seed_everything(0)
    module = module or make_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[CurriculumCallback(spec(run_steps, lrs)), *callbacks,
                                   RunCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)])
    trainer.fit(module, datamodule=make_data(shapeworld_dir), ckpt_path=ckpt_path)
    return trainer, module


def trainable_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if ".prw_" in k or k.endswith("entry_offset")}


def test_boundaries_switch_experts_data_and_losses(tmp_path, shapeworld_dir):
    rec = Recorder()
    trainer, module = fit(tmp_path, shapeworld_dir, [rec])
    assert trainer.global_step == 7 and module.model.num_active == 3
    for row in rec.rows:
        index = 0 if row["step"] < 2 else 1 if row["step"] < 5 else 2
        # only the newest expert and the routers train; the base never does
        assert row["trainable"] == [index] and row["routers"] and row["base_frozen"]
        # the mixture in use is the spec's, switched at exactly the boundary step
        assert row["tasks"] == {STEPS[index][0]}
        assert row["rho_alpha"] == ((1.0, 0.0) if index == 0 else (0.8, 0.5))
    # veterans are bit-identical from the moment they are frozen
    for later in rec.rows[2:]:
        assert torch.equal(later["experts"][0], rec.rows[2]["experts"][0])
    for later in rec.rows[5:]:
        assert torch.equal(later["experts"][1], rec.rows[5]["experts"][1])
    assert not torch.equal(rec.rows[2]["experts"][0], rec.rows[0]["experts"][0])  # expert 0 did train
    final = module.model.expert_parameters(1)
    assert torch.equal(torch.cat([p.detach().flatten() for p in final]), rec.rows[5]["experts"][1])


@pytest.mark.parametrize("stop", [3, 5])  # mid-step, and exactly at the boundary into the last step
def test_resume_from_last_ckpt_matches_an_uninterrupted_run(tmp_path, shapeworld_dir, stop, capsys):
    _, straight = fit(tmp_path / "straight", shapeworld_dir)
    first, _ = fit(tmp_path / "resumed", shapeworld_dir, [StopAt(stop)])
    assert first.global_step == stop
    capsys.readouterr()
    trainer, resumed = fit(tmp_path / "resumed", shapeworld_dir, ckpt_path=str(tmp_path / "resumed" / "last.ckpt"))
    assert trainer.global_step == 7
    # the resume is reported at the step it really resumes from (not the trainer's 0 before its state is back)
    done = stop - 2
    assert (f"curriculum: resume step 1 'grounding' (stage 1) at global step {stop} ({done} of its 3 steps done)"
            in capsys.readouterr().out)
    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class LearningRates(Callback):
    """The learning rate of each parameter group at every optimizer step."""

    def __init__(self):
        self.rows = {}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.rows.update({(trainer.global_step, g["name"]): g["lr"] for g in optimizer.param_groups})


@pytest.mark.parametrize("schedule, router_schedule", [("constant", None), ("cosine", None), ("cosine", "constant")])
def test_each_group_learning_rate_follows_the_spec_across_boundaries_and_a_resume_at_one(tmp_path, shapeworld_dir,
                                                                                         schedule, router_schedule):
    """Per curriculum step its own lr and router_lr (null: lr / 2), the warmup restarted at each boundary (and with
    the cosine schedule, the decay over that step's own length, to 0.1 of its lr; the routers' own schedule when
    set); the same after resuming from the checkpoint written exactly at the boundary into the last step."""
    lrs, warmup, floor = [(1e-2, None), (4e-3, 1e-3), (2e-3, None)], (2 if schedule == "constant" else 1), 0.1

    def factor(kind, s, n):
        if s < warmup:
            return (s + 1) / warmup
        if kind == "cosine":  # written out: the step's length n is the horizon
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (n - warmup)))
        return 1.0

    expected, start = {}, 0
    for (_, n), (lr, router_lr) in zip(STEPS, lrs):
        for g in range(start, start + n):
            expected[g, "experts"] = lr * factor(schedule, g - start, n)
            expected[g, "routers"] = ((lr / 2 if router_lr is None else router_lr)
                                      * factor(router_schedule or schedule, g - start, n))
        start += n
    if schedule == "cosine":  # the grounding step's last update is decayed: the test can tell the schedules apart
        assert expected[4, "experts"] == pytest.approx(4e-3 * 0.55)
        assert expected[4, "routers"] == pytest.approx(1e-3 * (1.0 if router_schedule == "constant" else 0.55))

    def module():
        optim = OptimConfig(warmup_steps=warmup, schedule=schedule, router_schedule=router_schedule, total_steps=7,
                            min_lr_ratio=floor)
        return CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                             prw=PRWConfig(num_experts=3, rank=4, alpha=8, router=RouterConfig(entry_warmup_steps=1)),
                             optim=optim)

    before, after = LearningRates(), LearningRates()
    first, _ = fit(tmp_path, shapeworld_dir, [before, StopAt(5)], module=module(), lrs=lrs)
    assert first.global_step == 5 and sorted({g for g, _ in before.rows}) == [0, 1, 2, 3, 4]
    trainer, _ = fit(tmp_path, shapeworld_dir, [after], ckpt_path=str(tmp_path / "last.ckpt"), module=module(),
                     lrs=lrs)
    assert trainer.global_step == 7 and sorted({g for g, _ in after.rows}) == [5, 6]
    assert {**before.rows, **after.rows} == pytest.approx(expected)


def test_a_stage_starts_from_the_previous_stage_checkpoint(tmp_path, shapeworld_dir):
    fit(tmp_path / "stage1", shapeworld_dir, run_steps=[0, 1])
    ckpt = tmp_path / "stage1" / "last.ckpt"
    stage2 = CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(num_experts=3, rank=4, alpha=8, router=RouterConfig(entry_warmup_steps=1)),
                           init_from=str(ckpt))
    assert stage2.model.num_active == 2
    before = [p.detach().clone() for p in stage2.model.expert_parameters(1)]
    trainer, module = fit(tmp_path / "stage2", shapeworld_dir, run_steps=[2], module=stage2)
    assert trainer.global_step == 2 and module.model.num_active == 3
    after = module.model.expert_parameters(1)
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # the veteran carried over, untouched


def test_a_stage_without_the_previous_one_says_what_to_run(tmp_path, shapeworld_dir):
    with pytest.raises(ValueError, match=r"curriculum starts at step 2 but the model has 1 active expert"):
        fit(tmp_path, shapeworld_dir, run_steps=[2])
    with pytest.raises(FileNotFoundError, match=r"make stage1"):
        CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                      prw=PRWConfig(num_experts=3, rank=4, alpha=8), init_from=str(tmp_path / "missing.ckpt"))


def test_the_progress_bar_counts_the_whole_run_and_names_the_curriculum_step(tmp_path, shapeworld_dir):
    """One bar over the run's 7 optimizer steps (the data's epochs are 4 batches), described by the curriculum step
    in progress; then resuming the finished run says so, and a checkpoint of another stage is refused."""
    from cologen import checkpoints
    from cologen.callbacks.progress import RunProgressBar
    from cologen.errors import UsageError

    bar = RunProgressBar()
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, *args):
            b = bar.train_progress_bar
            seen.append((b.n, b.total, b.desc.removesuffix(": ")))  # tqdm's set_description adds ': '

    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[CurriculumCallback(spec()), bar, Watch(),
                                   RunCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)])
    trainer.fit(make_module(), datamodule=make_data(shapeworld_dir))
    assert trainer.current_epoch >= 1  # the run crossed an epoch: the bar did not restart
    assert [(n, total) for n, total, _ in seen] == [(i, 7) for i in range(1, 8)]
    index = [0, 0, 1, 1, 1, 2, 2]
    assert [desc for _, _, desc in seen] == [
        f"{STEPS[i][0]} (curriculum step {i}, {i + 1} of 3 in this run)" for i in index]

    state = checkpoints.curriculum_state(checkpoints.check(tmp_path / "last.ckpt"))
    message = CurriculumCallback(spec()).resume_status(state, "last.ckpt")
    assert message == ("last.ckpt has already finished this run (curriculum steps 0 inpainting, 1 grounding, "
                       "2 control; 7 optimizer steps): nothing to resume")
    assert CurriculumCallback(spec([0, 1, 2])).resume_status(
        {**state, "index": 1, "done": 1}, "mid.ckpt") is None  # training left: resume
    with pytest.raises(UsageError, match=r"stopped in curriculum step 1 \(grounding\), which this run "
                                         r"\(curriculum.spec.run_steps \[2\]\) does not train"):
        CurriculumCallback(spec([2])).resume_status({**state, "index": 1, "done": 1}, "stage1.ckpt")
