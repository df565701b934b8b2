"""Command line: `megatron-opd train|erpd --config <recipe.yaml> key=value ...` and `megatron-opd demo`.

Run it directly for one process, or under torchrun for TP/PP/EP:
    torchrun --nproc_per_node 2 -m megatron_opd.cli train --config configs/recipes/tiny_opd.yaml \
        parallel.tensor_model_parallel_size=2
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from megatron_opd.config import load_config
    from megatron_opd.signals import PREEMPTED_EXIT_CODE
    from megatron_opd.trainer import OPDTrainer

    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before compute
    wanted = getattr(args, "require_objective", None)
    if wanted is not None and cfg.objective.name != wanted:
        raise ValueError(f"objective.name={cfg.objective.name}: `megatron-opd {wanted}` runs objective.name={wanted} "
                         "(use `megatron-opd train` for the others)")
    if cfg.objective.name == "erpd":
        raise ValueError("objective.name=erpd is a two-stage pipeline: run `megatron-opd erpd --config "
                         f"{args.config}` (or choose gopd, reopold or grpo for `train`)")
    from megatron_opd import parallel
    from megatron_opd.rollout.dedicated import is_engine_rank, serve_engine

    if is_engine_rank(cfg, parallel.launched_rank(), parallel.launched_world_size()):
        return serve_engine(cfg)  # rollout.placement=dedicated: this rank runs an engine only
    trainer = OPDTrainer(cfg)
    try:
        trainer.setup()
        final = trainer.train()
    finally:
        trainer.cleanup()
    if trainer.rank0:
        from megatron_opd.checkpoint import latest_checkpoint

        out = cfg.train.out_dir
        shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval/accuracy", "eval/pass@"))}
        how = "preempted: checkpointed at" if trainer.preempted else "done:"
        print(f"{how} step {trainer.step} of {cfg.train.steps}{', ' if shown else ''}"
              f"{', '.join(f'{k} {v}' for k, v in shown.items())}\n"
              f"outputs: {out}/metrics.jsonl, {out}/curves.png, {out}/tensorboard/, "
              f"checkpoint {latest_checkpoint(f'{out}/checkpoints')}", flush=True)
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


def _erpd(args) -> int:
    """ERPD: stage 1 on a fixed rollout batch, the stored signal, stage-2 distillation (erpd_pipeline.py)."""
    from megatron_opd.config import load_config
    from megatron_opd.erpd_pipeline import ERPDPipeline

    cfg = load_config(args.config, args.overrides)
    pipeline = ERPDPipeline(cfg)
    results = pipeline.run()
    if pipeline.tr.rank0:
        for key in ("base_acc", "erpd_stage1_acc", "erpd_stage2_acc", "erpd_stage1_kl", "erpd_stage2_kl"):
            print(f"{key}: {results[key]}")
        out = cfg.train.out_dir
        print(f"outputs: {out}/erpd_results.json, {out}/erpd_table.md, {out}/metrics.jsonl", flush=True)
    return 0


def _eval(args) -> int:
    """Held-out avg@k of one HF checkpoint with the recipe's data and rollout settings (no teacher is
    needed; a recipe's teachers are not loaded)."""
    import json

    from megatron_opd.config import load_config
    from megatron_opd.rollout.colocated import build_engine
    from megatron_opd.trainer import build_data

    cfg = load_config(args.config, args.overrides, require_teachers=False)
    data = build_data(cfg, args.checkpoint)
    engine = build_engine(cfg, args.checkpoint)
    try:
        metrics = data.evaluate(engine, k=cfg.train.eval_samples)
    finally:
        engine.shutdown()
    text = json.dumps(metrics, indent=2)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(text)
    print(text)
    return 0


def _init_tiny(args) -> int:
    """Write a tiny random Qwen3 student and teacher (and their tokenizer) for configs/recipes/tiny_opd.yaml."""
    from pathlib import Path

    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec

    out = Path(args.dir)
    spec = ModelSpec.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny_qwen3.yaml")
    train_tokenizer(out / "tokenizer")
    for role, seed in (("student", 0), ("teacher", 1)):
        save_tiny_checkpoint(spec, out / role, seed=seed, tokenizer_dir=out / "tokenizer", init_std=0.1)
    env = "" if str(out) == "runs/tiny_models" else f"MOPD_TINY_DIR={out} "
    print(f"wrote {out}/student and {out}/teacher (tiny random Qwen3, {spec.num_parameters():,} parameters)\n"
          f"next: {env}megatron-opd train --config configs/recipes/tiny_opd.yaml")
    return 0


def _check_env(args) -> int:
    """Installed torch / megatron-core / vLLM against the pins (megatron_opd/versions.py)."""
    from megatron_opd.versions import check_env

    try:
        print(f"environment ok: {check_env()}")
    except EnvironmentError as exc:
        print(f"megatron-opd: error: {exc}", file=sys.stderr)
        return 3
    return 0


def _demo(args) -> int:
    from megatron_opd.demo import DemoConfig, run_demo

    cfg = DemoConfig.from_overrides(args.overrides, out_dir=args.out_dir)
    run_demo(cfg, verbose=args.verbose)
    return 0


def _study(args) -> int:
    from megatron_opd.study import StudyConfig, run_study

    run_study(StudyConfig.load(args.config, args.overrides))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run an on-policy distillation recipe")
    p_train.add_argument("--config", required=True, help="recipe YAML (configs/recipes/)")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    p_train.set_defaults(func=_train)
    p_sft = sub.add_parser("sft", help="SFT on teacher samples (train with objective.name=sft)")
    p_sft.add_argument("--config", required=True, help="recipe YAML with objective.name: sft")
    p_sft.add_argument("overrides", nargs="*", help="key=value overrides")
    p_sft.set_defaults(func=_train, require_objective="sft")
    p_erpd = sub.add_parser("erpd", help="ERPD: stage-1 teacher on a fixed batch, then stage-2 distillation")
    p_erpd.add_argument("--config", required=True, help="recipe YAML with objective.name: erpd")
    p_erpd.add_argument("overrides", nargs="*", help="key=value overrides")
    p_erpd.set_defaults(func=_erpd)
    p_eval = sub.add_parser("eval", help="held-out avg@k of a HF checkpoint (recipe's data/rollout)")
    p_eval.add_argument("--config", required=True, help="recipe YAML for data and sampling settings")
    p_eval.add_argument("--checkpoint", required=True, help="HF checkpoint directory to evaluate")
    p_eval.add_argument("--output", default=None, help="write the metrics JSON here")
    p_eval.add_argument("overrides", nargs="*", help="key=value overrides")
    p_eval.set_defaults(func=_eval)
    p_tiny = sub.add_parser("init-tiny", help="write a tiny random student + teacher for tiny_opd.yaml")
    p_tiny.add_argument("dir", nargs="?", default="runs/tiny_models", help="output directory")
    p_tiny.set_defaults(func=_init_tiny)
    p_env = sub.add_parser("check-env", help="installed torch/megatron-core/vLLM vs. the pins (exit 3 if not)")
    p_env.set_defaults(func=_check_env)
    p_demo = sub.add_parser("demo", help="the embedded demo: build a teacher, distil a student on CPU")
    p_demo.add_argument("--out-dir", default="runs/demo", help="run directory (teacher cache inside)")
    p_demo.add_argument("--verbose", action="store_true", help="print each stage's command line")
    p_demo.add_argument("overrides", nargs="*", help="key=value overrides of DemoConfig fields")
    p_demo.set_defaults(func=_demo)
    p_study = sub.add_parser("study", help="a grid of methods x seeds on the demo's task: table + plots")
    p_study.add_argument("--config", required=True, help="study YAML (configs/studies/)")
    p_study.add_argument("overrides", nargs="*", help="key=value overrides of study fields, e.g. seeds=[1]")
    p_study.set_defaults(func=_study)
    args = parser.parse_args(argv)
    from megatron_opd.quiet import quiet_libraries

    quiet_libraries()
    from megatron_opd.rollout.engine import RolloutEngineError

    try:
        return args.func(args)
    except (*USER_ERRORS, RolloutEngineError) as exc:
        if args.debug:
            raise
        import os

        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"megatron-opd: error: {exc}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


#: Errors a user causes (config, paths, layouts, checkpoints or an engine that do not fit): one message,
#: no traceback (RolloutEngineError too: an engine that cannot start names the field to change).
USER_ERRORS = (ValueError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
