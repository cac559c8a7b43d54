"""Step-reduction benchmark on real digits: quality, NFE and CPU time per method, one run.

Teacher: the class-conditional UNet2DModel from ``train_digits_teacher.py``. For each
method the same labels (``--samples``, balanced over the 10 classes) and seed are
sampled as one batch on one CPU thread, then scored by ``compressor.adapters.digits``:
FD (Frechet distance to held-out real digits in a digits classifier's feature space)
and class accuracy. Rows: teacher DDIM-50 + CFG, teacher + adaptive guidance,
DPM-Solver++ at 8 / 4 steps (training-free), the guidance-distilled student, progressive
distillation at 8 / 4 steps and consistency distillation at 4 / 2 / 1 steps (both from
the guidance-distilled student), and the 4-step consistency student after the
``quantize`` pass (int8 W8A8 on the nn.Linear layers).

Writes ``benchmarks/results/steps_digits.json`` ({"rows": [...]}), ``steps_digits.md``
and a PNG grid per method (``steps_digits_<method>.png``, one row per class).

``--teacher benchmarks/.cache/digits-teacher-flow --name steps_digits_flow`` runs the same
rows on the text-conditional flow-matching SD3 transformer
(``train_digits_teacher.py --denoiser mmdit-flow``): there "ddim" is the FlowMatchEuler
sampler, "dpm++" DPM-Solver++ on flow sigmas, and the consistency student samples with
FlowMatchLCM.

    nice -n 10 python benchmarks/steps_digits.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch

from compressor.adapters.diffusion.adapter import DiffusersAdapter
from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.digits import NUM_CLASSES
from compressor.pipeline import Pass, PassContext
from compressor.planning import PlanState
from compressor.recipe import DataSpec
from compressor.targets import TARGETS

log = logging.getLogger("steps_digits")
HERE = Path(__file__).resolve().parent
TEACHER = HERE / ".cache" / "digits-teacher"
RESULTS = HERE / "results"


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10) -> None:
    from PIL import Image

    rows = []
    for c in range(NUM_CLASSES):
        imgs = images[labels == c][:per_class]  # (k, 1, 8, 8)
        row = torch.cat(list(imgs[:, 0]), dim=1)  # (8, 8k)
        rows.append(torch.nn.functional.pad(row, (0, 8 * per_class - row.shape[1]), value=-1))
    grid = ((torch.cat(rows, dim=0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def measure(
    adapter: DiffusersAdapter, model: DiffusionModel, method: str, n: int, name: str = "steps_digits"
) -> dict[str, Any]:
    labels = torch.arange(n) % NUM_CLASSES
    start = time.perf_counter()
    images, nfe = model.sample(labels, torch.Generator().manual_seed(0))
    wall = time.perf_counter() - start
    scores = adapter.scorer().score(images, labels)
    save_grid(images, labels, RESULTS / f"{name}_{method}.png")
    row = {
        "method": method,
        "steps": model.spec.steps,
        "nfe": round(nfe, 2),
        "fd": round(scores["fd"], 3),
        "class_acc": round(scores["class_acc"], 4),
        "ms_per_image": round(1000 * wall / n, 3),
    }
    log.info("%s", row)
    return row


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def run_pass(p: Pass, model: DiffusionModel, ctx: PassContext) -> tuple[DiffusionModel, float]:
    start = time.perf_counter()
    p.plan(PlanState.from_model(model, ctx.target, ctx.adapter))
    p.requires(model, ctx)
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    wall = time.perf_counter() - start
    log.info("pass %s: %.0fs %s", p.name, wall, dict(out.details))
    return cast(DiffusionModel, out.model), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=TEACHER)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--gd-steps", type=int, default=300, help="guidance_distill train steps")
    ap.add_argument("--pd-steps", type=int, default=150, help="progressive_distill train steps per round")
    ap.add_argument("--cd-steps", type=int, default=600, help="consistency_distill train steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--name", default="steps_digits", help="prefix of the result files under benchmarks/results"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # shared 2-core box: one thread is far faster than two under contention
    from compressor.passes.diffusion.adaptive_guidance import AdaptiveGuidancePass
    from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass
    from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
    from compressor.passes.diffusion.progressive_distill import ProgressiveDistillPass
    from compressor.passes.diffusion.scheduler import SchedulerPass
    from compressor.passes.quantize.quantize import QuantizePass

    RESULTS.mkdir(parents=True, exist_ok=True)
    adapter = DiffusersAdapter(eval_samples=args.samples)
    teacher = load_diffusion_model(args.teacher)
    data = adapter.make_data(
        DataSpec(corpus="sklearn-digits", calibration_samples=128, batch_size=args.batch_size), seed=0
    )
    ctx = PassContext(target=TARGETS["cpu"], adapter=adapter, teacher=copy.deepcopy(teacher), data=data)
    n, rows, train_s = args.samples, [], {}

    rows.append(measure(adapter, teacher, "teacher_ddim_cfg", n, args.name))
    ag, _ = run_pass(AdaptiveGuidancePass(AdaptiveGuidancePass.Config(threshold=0.99)), teacher, ctx)
    rows.append(measure(adapter, ag, "teacher_ddim_adaptive_guidance", n, args.name))
    for steps in (8, 4):
        dpm, _ = run_pass(
            SchedulerPass(SchedulerPass.Config(solver="dpmsolver++", steps=steps)), teacher, ctx
        )
        rows.append(measure(adapter, dpm, f"teacher_dpm++_{steps}", n, args.name))

    gd_cfg = GuidanceDistillPass.Config(
        train_steps=args.gd_steps, batch_size=args.batch_size, guidance_min=1.0, guidance_max=2.0
    )
    gd, train_s["guidance_distill"] = run_pass(GuidanceDistillPass(gd_cfg), teacher, ctx)
    rows.append(measure(adapter, gd, "guidance_distilled_ddim", n, args.name))

    pd = gd
    for final in (8, 4):
        cfg = ProgressiveDistillPass.Config(
            final_steps=final, start_steps=32 if final == 8 else None, train_steps=args.pd_steps,
            batch_size=args.batch_size,
        )  # fmt: skip
        pd, train_s[f"progressive_distill_to_{final}"] = run_pass(ProgressiveDistillPass(cfg), pd, ctx)
        rows.append(measure(adapter, pd, f"progressive_{final}", n, args.name))

    cd_cfg = ConsistencyDistillPass.Config(
        sampling_steps=4, train_steps=args.cd_steps, batch_size=args.batch_size
    )
    cd, train_s["consistency_distill"] = run_pass(ConsistencyDistillPass(cd_cfg), gd, ctx)
    for steps in (4, 2, 1):
        rows.append(measure(adapter, cd.with_spec(steps=steps), f"consistency_{steps}", n, args.name))

    q, train_s["quantize"] = run_pass(QuantizePass(), cd, ctx)
    rows.append(measure(adapter, q, "consistency_4_int8", n, args.name))
    n_int8 = sum(1 for m in q.modules() if type(m).__name__ == "Int8Linear")
    lin_params = sum(m.weight.numel() for m in q.modules() if type(m).__name__ == "Int8Linear")
    all_params = sum(p.numel() for p in q.parameters())

    scorer = adapter.scorer()
    out = {
        "rows": rows,
        "samples": n,
        "reference_fd_real_train_vs_heldout": round(scorer.reference_fd, 3),
        "classifier_heldout_accuracy": round(scorer.classifier.heldout_accuracy, 4),
        "train_seconds": {k: round(v, 1) for k, v in train_s.items()},
        "int8": {"int8_linear_layers": n_int8, "int8_weight_fraction": round(lin_params / all_params, 4)},
        "teacher": json.loads((args.teacher / "training.json").read_text()),
        "command": "nice -n 10 python benchmarks/steps_digits.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("teacher", "name")
        )
        + ("" if args.name == "steps_digits" else f" --teacher {_rel(args.teacher)} --name {args.name}"),
        "denoiser": type(teacher.unet).__name__,
        "objective": teacher.schedule.objective,
        "threads": 1,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = ["| method | steps | NFE | FD | class acc | ms/image |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['fd']:.3f} | {r['class_acc']:.3f} | {r['ms_per_image']:.2f} |"
        for r in rows
    ]
    lines.append(f"\nReference FD (real train vs held-out digits): {out['reference_fd_real_train_vs_heldout']}; "
                 f"{n} samples per method, one CPU thread, batch = all samples.")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
