"""Benchmark: how often the shipped demo model draws what it is asked (background, colour, shape, position),
judged from pixels, no model. Targets: background >= 95 %, colour >= 90 %, shape >= 75 %, position >= 80 %.

Every held-out caption (``training.shapes.held_out_combinations``: 60 combinations the training never
saw), with 2 seeds each, through the service's own engine (the ``DiffusersEngine`` a worker runs, the built-in
registry, Compel prompt encoding): 1024 x 1024, 30 steps, guidance 7.5 (with the registry's guidance rescale and
stop for the model), the model's default sampler. Each PNG
goes to ``training.judge`` (background from the border, shape pixels, colour, centre, hull moments).

Printed: the table of the four targets (and size, not a target), what the misses were read as, and the
median generation time per image on this machine. Written: a contact sheet of ``--sheet`` images (every seed of
captions spread evenly over the held-out list, so every shape is on it) with what the judge read under each
(``--contact-sheet``, default ``docs/demo-contact-sheet.png``).

    .venv/bin/python bench/demo_prompt_following.py [--seeds 2] [--limit N] [--contact-sheet PATH] [--guidance G]
                                                    [--sampler S] [--save-images DIR]

``--guidance`` and ``--sampler`` are for diagnosis (how much of a miss is the guidance's, or the sampler's);
the targets are for the table printed with neither.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, Headline, Table, quiet_libraries, report
from PIL import Image, ImageDraw

from imagen.config import Settings
from imagen.generation.base import GenerationTask
from imagen.registry.builtin import DEMO_MODEL_ID, builtin_registry
from training import shapes
from training.judge import judge, score

TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.75, "position": 0.80}
LABELS = {
    "background": "background colour right",
    "colour": "shape colour right",
    "shape": "shape right",
    "position": "position right (the caption gives one)",
    "size": "size right (not a target)",
}
SEED_BASE = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out captions")
    parser.add_argument("--sheet", type=int, default=24, help="images on the contact sheet")
    parser.add_argument("--contact-sheet", type=Path, default=REPO / "docs" / "demo-contact-sheet.png")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (the targets': 7.5)")
    parser.add_argument("--sampler", default=None, help="an A1111 sampler name (default: the model's own)")
    parser.add_argument("--save-images", type=Path, default=None, help="also write every judged PNG here")
    args = parser.parse_args()
    quiet_libraries()

    from imagen.generation.diffusers.engine import DiffusersEngine

    scenes = shapes.held_out_combinations(0)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), engine="diffusers")  # what `imagen serve` uses by default
        registry = builtin_registry()
        engine = DiffusersEngine(registry, settings)
        right: dict[str, int] = collections.Counter()
        misses: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        seconds: list[float] = []
        sheet: list[tuple[Image.Image, str, str, bool]] = []
        sheet_every = max(1, len(scenes) * args.seeds // max(1, args.sheet))  # captions 0, 5, 10, ... of 60
        total = 0
        for i, scene in enumerate(scenes):
            for s in range(args.seeds):
                task = GenerationTask(
                    prompt=shapes.caption(scene), negative_prompt=None, model=DEMO_MODEL_ID, steps=30,
                    guidance_scale=args.guidance, seed=SEED_BASE + 97 * i + s, width=1024, height=1024,
                    scheduler=args.sampler,
                )
                started = time.perf_counter()
                image = engine.generate(task, lambda step, percent: None)[0].image
                seconds.append(time.perf_counter() - started)
                verdict = judge(image)
                if args.save_images is not None:
                    args.save_images.mkdir(parents=True, exist_ok=True)
                    image.save(args.save_images / f"{i:02d}-{s}-{shapes.caption(scene).replace(' ', '_')}.png")
                marks = score(scene, verdict)
                total += 1
                for what, ok in marks.items():
                    right[what] += ok
                    if not ok:
                        misses[what][f"{getattr(scene, what)} -> {getattr(verdict, what)}"] += 1
                if i % sheet_every == 0 and len(sheet) < args.sheet:
                    read = f"{verdict.colour} {verdict.shape} / {verdict.background}"
                    sheet.append((image, shapes.caption(scene), read, all(marks.values())))
            print(f"{i + 1}/{len(scenes)} captions judged", file=sys.stderr, flush=True)

    spec = registry.model(DEMO_MODEL_ID)
    own = [] if spec is None else [
        *([f"rescale {spec.guidance_rescale:g}"] if spec.guidance_rescale else []),
        *([f"stopping after {spec.guidance_stop:.0%} of the steps"] if spec.guidance_stop < 1 else []),
    ]
    rescale = f" ({', '.join(own)})" if own else ""
    sampler = args.sampler or "the model's own"
    rows, headlines = [], []
    for what, label in LABELS.items():
        share = right[what] / total
        target = TARGETS.get(what)
        met = "—" if target is None else ("yes" if share >= target else "**no**")
        target_text = "—" if target is None else f"≥ {target:.0%}"
        rows.append([label, f"{right[what]}/{total} = {share:.0%}", target_text, met])
        headlines.append(Headline(label, f"{share:.0%}", target_text))
    notes = [f"misses, {what}: " + ", ".join(f"{k} ({n})" for k, n in misses[what].most_common(6))
             for what in LABELS if misses[what]]
    notes.append(f"generation: median {statistics.median(seconds):.2f} s per image (min {min(seconds):.2f}, "
                 f"max {max(seconds):.2f}), 30 steps at 1024x1024 on this machine")
    report(
        f"Demo model, judged: {len(scenes)} held-out captions x {args.seeds} seeds = {total} images, 1024x1024, "
        f"30 steps, guidance {args.guidance:g}{rescale}, sampler {sampler}, {engine.device.type}",
        Table(["what", "right", "target", "met"], rows),
        dtype=str(engine.dtype).removeprefix("torch."), notes=notes, headlines=headlines,
    )
    write_sheet(sheet, args.contact_sheet)
    shown = args.contact_sheet.resolve()
    print(f"contact sheet: {shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown}")
    return 0


def write_sheet(items: list[tuple[Image.Image, str, str, bool]], path: Path, columns: int = 6) -> None:
    """Thumbnails with the caption and what the judge read (red when any part was read wrong)."""
    thumb, label = 160, 58
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, (image, caption, read, ok) in enumerate(items):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + label)
        sheet.paste(image.resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        words = caption.removeprefix("a ").split(" ")
        lines = [" ".join(words[:3]), " ".join(words[3:])]
        for line, text in enumerate([*lines, f"read: {read}"]):
            colour = (0, 0, 0) if line < 2 else ((0, 110, 0) if ok else (190, 0, 0))
            draw.text((x + 3, y + thumb + 2 + 13 * line), text[:30], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
