"""Run the downstream tasks on one model and format the results.

``evaluate(model, data=..., train_data=..., tasks=...)`` extracts features once per split and
hands them to the task modules (zero_shot, retrieval, linear_probe, few_shot).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

from .data import PROBE_FEATURES, Features, extract_features
from .few_shot import DEFAULT_SEEDS, DEFAULT_SHOTS, few_shot
from .linear_probe import linear_probe
from .retrieval import retrieval
from .zero_shot import DEFAULT_TEMPLATES, zero_shot

TASKS = ("zero_shot", "retrieval", "linear_probe", "few_shot", "localization")


def read_lines(path: str) -> List[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def builtin_paths(root: str, image_size: int, dataset: Optional[str] = None) -> Dict[str, object]:
    """``root/heldout`` (evaluation) and ``root/train`` of a built-in dataset, with its class names
    and prompt templates from ``root/classes.json``. Writes the dataset first when ``root`` holds
    none: ``dataset`` (scenes | shapes | digits), or by default the one ``root``'s name names
    (``data/shapes`` -> shapes), else scenes."""
    import json
    from ..data import builtin
    if not (os.path.isdir(os.path.join(root, "heldout")) and os.path.isdir(os.path.join(root, "train"))):
        named = os.path.basename(os.path.normpath(root))
        how = "--builtin-name" if dataset else ("the folder's name" if named in builtin.BUILTIN_DATASETS else
                                                "the default; --builtin-name shapes|digits for the others")
        dataset = dataset or (named if named in builtin.BUILTIN_DATASETS else "scenes")
        print(f"[evaluate] writing the built-in {dataset!r} dataset to {root} ({how}; image size {image_size})",
              flush=True)
        builtin.write_named_builtin(dataset, root, image_size=image_size)
    classes = os.path.join(root, "classes.json")
    if os.path.isfile(classes):
        with open(classes) as f:
            meta = json.load(f)
        names, templates = meta["class_names"], meta["templates"]
    else:  # written by an older make_shards.py: the digits
        names, templates = builtin.class_names(), builtin.zero_shot_templates()
    return {"data": os.path.join(root, "heldout"), "train_data": os.path.join(root, "train"),
            "class_names": names, "templates": templates}


def _class_names(test: Features, train: Optional[Features], given: Optional[Sequence[str]]) -> Optional[List[str]]:
    if given:
        return list(given)
    names = dict(train.class_names) if train is not None else {}
    names.update(test.class_names)
    if not names or test.labels is None:
        return None
    labels = set(test.labels.tolist()) | (set(train.labels.tolist()) if train is not None and train.labels is not None else set())
    if sorted(names) != list(range(max(labels) + 1)):
        return None  # names missing for some label ids
    return [names[i] for i in range(len(names))]


def _skips(what: str, features: Features) -> str:
    n = sum(features.skipped.values())
    return f"; skipped {n} {what} sample(s): {dict(sorted(features.skipped.items()))}" if n else "; nothing skipped"


def evaluate(model, *, data: str, train_data: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
             class_names: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
             shots: Sequence[int] = DEFAULT_SHOTS, seeds: Sequence[int] = DEFAULT_SEEDS, few_shot_method: str = "ncm",
             probe_c: Optional[float] = None, batch_size: int = 128, max_samples: int = 0,
             max_train_samples: int = 0, probe_features: str = "encoder", log=print) -> Dict[str, object]:
    """Run ``tasks`` on ``data`` and return every number.

    ``tasks=None`` runs every task the data allows and records each one it left out, with the
    reason, as ``{"skipped": reason}`` (zero-shot needs labels and class names, retrieval
    captions, the linear probe and k-shot labelled ``train_data``, localisation object masks);
    a task named explicitly that cannot run is an error. ``data`` may be LAION-layout shards,
    an ImageFolder, or a CLIP_benchmark set (``make_shards.py --layout clip_benchmark``: its
    folder or a split), whose class names, templates and ``train`` split are defaults.
    ``probe_features``: what the linear probe and k-shot read -- ``encoder`` (pooled,
    final-normed encoder features before the projection, as the paper's tables) or ``joint``
    (the projected image-text embedding). Samples the readers dropped are counted by reason in
    ``results["skipped_samples"]``."""
    from ..data.clip_benchmark import read_layout
    strict = tasks is not None
    tasks = list(TASKS if tasks is None else tasks)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    if probe_features not in PROBE_FEATURES:
        raise ValueError(f"unknown probe features {probe_features!r}; choose from {PROBE_FEATURES}")
    layout, cb = "laion", read_layout(data)
    if cb is not None:
        layout, data = "clip_benchmark", cb["data"]
        class_names, templates = class_names or cb["class_names"], templates or cb["templates"]
        train_data = train_data or cb["train_data"]
        log(f"[evaluate] CLIP_benchmark set {cb['root']}: images and KEY.cls labels of {data}, "
            f"{len(cb['class_names'])} class names" + (f", training split {train_data}" if train_data else ""))
    left_out: Dict[str, str] = {}

    def leave_out(task: str, reason: str) -> None:
        if strict:
            raise ValueError(f"{task}: {reason}")
        left_out[task] = reason
        tasks.remove(task)

    for task in ("linear_probe", "few_shot"):
        if task in tasks and not train_data:
            leave_out(task, "needs labelled training images (--train-data)")
    probing = bool({"linear_probe", "few_shot"} & set(tasks))
    with_encoder = probing and probe_features == "encoder"
    if probing:
        log(f"[evaluate] linear probe / k-shot on {probe_features} features"
            + (" (pooled, final-normed, pre-projection)" if with_encoder else " (projected joint embedding)"))
    t0 = time.time()
    test = extract_features(model, data, batch_size=batch_size, max_samples=max_samples,
                            with_text="retrieval" in tasks, with_encoder=with_encoder, layout=layout)
    log(f"[evaluate] {len(test)} evaluation images from {data} ({time.time() - t0:.1f}s){_skips('evaluation', test)}")
    train = None
    if probing:
        t0 = time.time()
        train = extract_features(model, train_data, batch_size=batch_size, max_samples=max_train_samples,
                                 with_text=False, with_encoder=with_encoder, layout=layout)
        log(f"[evaluate] {len(train)} training images from {train_data} ({time.time() - t0:.1f}s)"
            f"{_skips('training', train)}")
    results: Dict[str, object] = {"data": data, "train_data": train_data, "num_images": len(test), "tasks": {},
                                  "skipped_samples": {"data": dict(test.skipped),
                                                      "train_data": dict(train.skipped) if train else {}}}
    out = results["tasks"]
    names = _class_names(test, train, class_names)
    for task in [t for t in tasks if t in ("zero_shot", "linear_probe", "few_shot")]:
        if test.labels is None:
            leave_out(task, f"{data} has no labels (KEY.json 'label', KEY.cls, or ImageFolder folders)")
        elif task != "zero_shot" and train.labels is None:
            leave_out(task, f"{train_data} has no labels (KEY.json 'label', KEY.cls, or ImageFolder folders)")
        elif task == "zero_shot" and names is None:
            leave_out(task, "needs class names: --class-names FILE, or shards whose JSON has 'class_name'")
    if "retrieval" in tasks and (test.text is None or not any(test.captions)):
        leave_out("retrieval", "no captions in the evaluation data (ImageFolder or CLIP_benchmark layout)")
    if "localization" in tasks and layout == "clip_benchmark":
        leave_out("localization", "needs object masks (KEY.json 'objects', as --builtin scenes writes)")
    for task in tasks:
        t0 = time.time()
        if task == "zero_shot":
            out[task] = zero_shot(model, test.image, test.labels, names, list(templates or DEFAULT_TEMPLATES))
        elif task == "retrieval":
            out[task] = retrieval(test.image, test.text)
        elif task == "localization":
            from .data import is_image_folder
            from .localization import localization
            out[task] = ({"skipped": "ImageFolder data has no object masks"} if is_image_folder(data) else
                         localization(model, data, batch_size=batch_size, max_samples=max_samples))
            if "skipped" in out[task]:
                left_out[task] = out[task]["skipped"]
                continue
        elif task == "linear_probe":
            out[task] = linear_probe(train.probe_features(probe_features), train.labels,
                                     test.probe_features(probe_features), test.labels, c=probe_c)
            out[task]["features"] = probe_features
        elif task == "few_shot":
            out[task] = few_shot(train.probe_features(probe_features), train.labels,
                                 test.probe_features(probe_features), test.labels, shots=shots, seeds=seeds,
                                 method=few_shot_method)
            out[task]["features"] = probe_features
        out[task]["seconds"] = round(time.time() - t0, 2)
    for task, reason in left_out.items():
        out[task] = {"skipped": reason}
    if left_out:
        log("[evaluate] left out: " + "; ".join(f"{t} ({r})" for t, r in left_out.items()))
    return results


def format_table(results: Dict[str, object]) -> str:
    """A readable summary: one line per metric, with chance level next to it."""
    rows = [("task", "metric", "value", "chance")]
    tasks = {k: v for k, v in results["tasks"].items() if "skipped" not in v}
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    if "zero_shot" in tasks:
        z = tasks["zero_shot"]
        rows += [("zero-shot", f"top-1 ({z['num_classes']} classes, {z['num_templates']} prompts)", pct(z["top1"]),
                  pct(z["chance_top1"])), ("zero-shot", "top-5", pct(z["top5"]), pct(min(1.0, 5 * z["chance_top1"])))]
    if "retrieval" in tasks:
        r = tasks["retrieval"]
        for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            for k, v in r[direction].items():
                rows.append(("retrieval", f"{label} {k} ({r['num_pairs']} pairs)", pct(v), pct(r["chance"][k])))
    if "localization" in tasks:
        loc = tasks["localization"]
        rows.append(("localization", f"object patches -> own phrase ({loc['num_objects']} objects)",
                     pct(loc["accuracy"]), pct(loc["chance"])))
    if "linear_probe" in tasks:
        p = tasks["linear_probe"]
        rows.append(("linear probe", f"top-1 ({p.get('features', 'joint')} features, C={p['C']:g}, "
                     f"{p['train_samples']} train)", pct(p["top1"]),
                     pct(p["chance_top1"])))
    if "few_shot" in tasks:
        f = tasks["few_shot"]
        for k, v in f["shots"].items():
            rows.append(("k-shot", f"{k}-shot top-1 ({f['method']}, {f.get('features', 'joint')}, "
                                   f"{len(f['seeds'])} seeds)",
                         f"{100 * v['mean']:6.2f}% ± {100 * v['std']:.2f}", pct(f["chance_top1"])))
    for task, value in results["tasks"].items():
        if "skipped" in value:
            rows.append((task.replace("_", " "), "left out", value["skipped"], ""))
    skipped = {k: v for part in results.get("skipped_samples", {}).values() for k, v in part.items()}
    if skipped:
        rows.append(("data", "skipped samples", str(sum(skipped.values())), ", ".join(f"{k} {v}" for k, v in
                                                                                  sorted(skipped.items()))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
