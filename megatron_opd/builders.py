"""What `OPDTrainer.setup` builds, one function per job: the roles' checkpoints and specs, the checks
that need no compute, the Megatron models of every role, and the rollout side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_opd import parallel, platform
from megatron_opd.config import ModelRoleConfig, OPDConfig


@dataclass
class RunModels:
    """Where every role's weights and architecture come from, resolved before any compute."""

    student: object  # HFCheckpoint
    spec: object  # ModelSpec of the student
    teachers: list
    teacher_specs: list
    reference: Optional[object] = None  # HFCheckpoint, when the objective needs a reference
    reference_spec: Optional[object] = None

    @property
    def specs(self) -> list:
        return [self.spec, *self.teacher_specs, *([self.reference_spec] if self.reference_spec else [])]

    @property
    def has_moe(self) -> bool:
        return any(s.is_moe for s in self.specs)


def resolve_models(cfg: OPDConfig) -> RunModels:
    """Every role's checkpoint and spec (a recipe's spec file, else the checkpoint's config). The
    reference, when needed, defaults to the student's checkpoint and is recorded in `cfg.reference`,
    so config.yaml names the reference that actually runs."""
    from megatron_opd.models.hf_mapping import HFCheckpoint
    from megatron_opd.models.spec import ModelSpec

    student = HFCheckpoint(cfg.student.checkpoint, role="student.checkpoint")
    teachers = [HFCheckpoint(t.checkpoint, role=f"teachers[{i}].checkpoint") for i, t in enumerate(cfg.teachers)]
    models = RunModels(
        student=student, spec=ModelSpec.from_yaml(cfg.student.spec) if cfg.student.spec else student.spec(),
        teachers=teachers,
        teacher_specs=[ModelSpec.from_yaml(t.spec) if t.spec else c.spec() for t, c in zip(cfg.teachers, teachers)])
    if cfg.needs_reference:
        role = cfg.reference
        models.reference = HFCheckpoint(role.checkpoint if role and role.checkpoint else cfg.student.checkpoint,
                                        role="reference.checkpoint" if role and role.checkpoint else "student.checkpoint")
        models.reference_spec = ModelSpec.from_yaml(role.spec) if role and role.spec else models.reference.spec()
        cfg.reference = ModelRoleConfig(checkpoint=str(models.reference.path), spec=role.spec if role else None,
                                        offload=bool(role.offload) if role else False)
    return models


def check_run(cfg: OPDConfig, models: RunModels):
    """Every check that needs no compute, before process groups exist: vocabularies and tokenizers,
    the engine's capacity and placement, each model against the layout, the batch split, and whether the
    newest checkpoint may be resumed with this config. Returns (layout, checkpoint to resume or None)."""
    from megatron_opd.checkpoint import latest_checkpoint
    from megatron_opd.rollout.engine import check_rollout_capacity
    from megatron_opd.trainer import check_batch_split, check_resumable, check_tokenizers, check_vocabularies

    same = [i for i, t in enumerate(cfg.teachers) if t.tokenizer == "same"]  # cross: build_cross_tokenizers
    check_vocabularies(models.spec, [models.teacher_specs[i] for i in same], models.reference_spec, cfg,
                       roles=[f"teachers[{i}]" for i in same])
    check_tokenizers(models.student.path, [(f"teachers[{i}]", models.teachers[i].path) for i in same]
                     + ([("reference", models.reference.path)] if models.reference else []))
    check_rollout_capacity(cfg.rollout, models.spec)
    p = cfg.parallel
    for s in models.specs:
        s.validate_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                            p.expert_model_parallel_size, p.etp)
    from megatron_opd.rollout.dedicated import trainer_world

    layout = parallel.validate_layout(p, trainer_world(cfg, parallel.launched_world_size()))
    check_engines(cfg, models.spec, layout.world)
    check_batch_split(cfg, layout.dp)
    out = Path(cfg.train.out_dir)
    check_writable(out)
    report = print if parallel.launched_rank() == 0 else None
    ckpt = latest_checkpoint(out / "checkpoints", report=report) if cfg.train.resume != "false" else None
    if ckpt is not None:
        for line in check_resumable(ckpt, cfg, layout.dp):
            if report is not None:
                report(line)
    return layout, ckpt


def check_writable(out: Path) -> None:
    """The run directory must be writable before any model is built (minutes with a 30B teacher)."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_check_"):
            pass
    except OSError as exc:
        raise ValueError(f"train.out_dir={str(out)!r} is not writable ({exc.strerror or exc}); choose a directory "
                         "this job can write to") from None


def check_engines(cfg: OPDConfig, spec, world: int) -> list:
    """The engine placement of a run (rollout/placement.py), refused at start-up when an engine size
    cannot be: it must divide the replica and the model's heads, and stay on one node."""
    from megatron_opd.rollout.colocated import local_world_size
    from megatron_opd.rollout.placement import plan_for_config

    if cfg.rollout.placement == "dedicated":  # one engine of TP 1 per dedicated rank
        return []
    return plan_for_config(cfg, world, local_world_size(), spec)


def build_models(cfg: OPDConfig, models: RunModels, needs):
    """The student (DDP-wrapped, trainable) and the frozen teachers (those the objective scores with)
    and reference, each built on the run's layout and loaded from its HF checkpoint. Frozen roles with
    `offload: true` wait in host memory until they score (OPDTrainer.on_device)."""
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.models.hf_mapping import load_hf_into_megatron
    from megatron_opd.models.student import wrap_ddp

    def build(spec, ckpt, role):
        model = build_gpt_model(spec, cfg.parallel, cfg.precision, role=role)
        load_hf_into_megatron(model, spec, ckpt)
        return model

    student = wrap_ddp(build(models.spec, models.student, "student"), cfg.optim)
    teachers = [build(s, c, "teacher") for s, c in zip(models.teacher_specs, models.teachers)] \
        if needs.teachers else []
    reference = build(models.reference_spec, models.reference, "reference") if models.reference else None
    for model, role in [*zip(teachers, cfg.teachers), (reference, cfg.reference)]:
        if model is not None and role.offload:
            platform.offload(model)
    return student, teachers, reference


def build_rollout(cfg: OPDConfig, models: RunModels, verify, needs):
    """The rollout side: colocated engines serving the student (off-policy objectives, SFT on teacher
    samples, also get the first teacher's engine, which samples the training batch), or the dedicated
    engine ranks (rollout/dedicated.py)."""
    from megatron_opd.rollout.colocated import ColocatedRollout

    if cfg.rollout.placement == "dedicated":
        from megatron_opd.rollout.dedicated import DedicatedRollout

        return DedicatedRollout(cfg, models.spec)

    return ColocatedRollout(cfg, models.student.path, models.spec, verify=verify,
                            sampler_dir=models.teachers[0].path if needs.teacher_samples else None)


def build_cross_tokenizers(cfg: OPDConfig, models: RunModels, system_prompt: Optional[str]) -> list:
    """Per teacher, a `cross_tokenizer.CrossTokenizer` (teachers[i].tokenizer: cross) or None. Both
    tokenizers are checked here (byte-level, an end-of-turn token), before any weight is built."""
    from transformers import AutoTokenizer

    from megatron_opd.cross_tokenizer import CrossTokenizer

    out = []
    for i, (t, ckpt) in enumerate(zip(cfg.teachers, models.teachers)):
        if t.tokenizer != "cross":
            out.append(None)
            continue
        cross = CrossTokenizer(AutoTokenizer.from_pretrained(str(models.student.path)),
                               AutoTokenizer.from_pretrained(str(ckpt.path)), cfg.rollout, system_prompt)
        if parallel.launched_rank() == 0:
            print(f"[megatron_opd] teachers[{i}].tokenizer=cross: "
                  + ("it has the student's vocabulary; responses are re-tokenized anyway (one-token spans "
                     "where the student's tokenization is the canonical one)" if cross.same_vocabulary() else
                     f"its own tokenizer ({len(cross.teacher)} tokens, the student's {len(cross.student)}): "
                     "responses re-tokenized and aligned on byte offsets"), flush=True)
        out.append(cross)
    return out
