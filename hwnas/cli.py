"""The ``hwnas`` command line. Thin: parse, load the config, call the API.

Heavy libraries (torch, timm, faiss, onnxruntime, optuna) are imported inside the command
handlers, never at module level, so ``hwnas --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from hwnas import __version__
from hwnas.config import PICKS_IN_BAND
from hwnas.errors import HwnasError

EXAMPLES = {
    "data": """\
        examples:
          hwnas data --dataset fashion-mnist --run-dir runs/fmnist
          hwnas data --dataset omniglot --protocol open --run-dir runs/omni
          hwnas data --dataset folder --data-dir ~/photos --protocol open
          hwnas data --dataset manifest --data-dir images.csv   # path,label[,split]""",
    "space": """\
        examples:
          hwnas space                                   # the default space
          hwnas space --config configs/quickstart.yaml --sample 5
          hwnas space --arch 'k3@1,k5@0.6,skip,xc@2/...'  # FLOPs/params of one arch""",
    "train-gallery": """\
        examples:
          hwnas train-gallery --config configs/quickstart.yaml
          hwnas train-gallery --config c.yaml --set gallery.backbone=resnet50 --set gallery.train.epochs=30
          hwnas train-gallery --config c.yaml --backbone-checkpoint my_resnet50.safetensors --freeze-backbone
          torchrun --standalone --nproc_per_node 2 -m hwnas.cli train-gallery --config c.yaml""",
    "train-supernet": """\
        examples:
          hwnas train-supernet --config configs/quickstart.yaml
          hwnas train-supernet --config c.yaml --resume          # continue after a kill
          hwnas train-supernet --config c.yaml --set supernet.loss.bct=0   # regression only
          torchrun --standalone --nproc_per_node 2 -m hwnas.cli train-supernet --config c.yaml""",
    "train-query": """\
        examples:
          hwnas train-query --config c.yaml --arch 'k3@1,k5@0.6,skip,...'   # inherits supernet weights
          hwnas train-query --config c.yaml --timm mobilenetv3_small_050     # a fixed baseline
          hwnas train-query --config c.yaml --arch ... --no-inherit --set query.loss.bct=0""",
    "adapt": """\
        examples:
          hwnas adapt --config configs/omniglot.yaml --epochs 15     # query/searched -> query/searched-adapted
          hwnas adapt --config c.yaml --query runs/x/query/NAME --images /srv/catalog/   # your index's images
          hwnas deploy --config c.yaml --query runs/x/query/searched-adapted""",
    "evaluate": """\
        examples:
          hwnas evaluate --config c.yaml --query runs/quickstart/query/NAME
          hwnas evaluate --config c.yaml --arch 'k3@1,...'   # a supernet subnet, BN recalibrated
          hwnas evaluate --config c.yaml --query DIR --part val --json
          hwnas evaluate --config c.yaml --query DIR --far 1e-3 --far 1e-4   # + verification (faces)""",
    "profile": """\
        examples:
          hwnas profile --device cpu --config configs/quickstart.yaml            # build the table
          hwnas profile --device cpu --config configs/quickstart.yaml --validate 100
          hwnas profile --device cpu --threads 1 --out latency_tables/edge-1t.json
          hwnas profile --device cpu --only-missing     # fill ops a table lacks
          hwnas profile --device gpu --config c.yaml     # TensorRT (or torch-cuda) + gallery images/s""",
    "search": """\
        examples:
          hwnas search --config configs/quickstart.yaml --budget-ms 0.2
          hwnas search --config c.yaml --budget-ms 5 --reward r3 --alpha 0.5 --sampler evolution
          hwnas search --config c.yaml --budget-ms 5 --multi-objective --sampler nsga2
          hwnas search --config c.yaml --budget-ms 5 --storage postgresql://user@host/db --study-name s1
          hwnas search --config c.yaml --budget-ms 5 --storage journal:/shared/search.log  # many workers""",
    "deploy": """\
        examples:
          hwnas deploy --config configs/quickstart.yaml              # RUN_DIR/bundle
          hwnas deploy --config c.yaml --int8 --index HNSW32 --out /srv/bundle
          hwnas deploy --config c.yaml --query runs/x/query/timm-mobilenetv3_small_050
          hwnas verify runs/quickstart/bundle""",
    "verify": """\
        examples:
          hwnas verify runs/quickstart/bundle""",
    "run": """\
        examples:
          hwnas run configs/quickstart.yaml
          hwnas run configs/omniglot.yaml --run-dir runs/omni
          hwnas run configs/quickstart.yaml --from train-query   # and what builds on it""",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON config file (flags override it)")
    p.add_argument("--run-dir", help="run directory (default: from the config, runs/default)")
    _add_set(p)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set supernet.train.epochs=5 "
                   "(repeatable; VALUE is read as YAML)")


def _add_resume(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint (after a kill)")
    g.add_argument("--restart", action="store_true",
                   help="discard earlier checkpoints and results of this step, start over")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["fashion-mnist", "omniglot", "folder", "manifest", "digits"],
                   help="data source (default fashion-mnist)")
    p.add_argument("--data-dir", help="where the data is: IDX directory, Omniglot zip directory, "
                   "class-folder root, or manifest CSV")
    p.add_argument("--protocol", choices=["closed", "open"], help="evaluation protocol")
    p.add_argument("--seed", type=int, help="split seed")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip (and count) unreadable images instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hwnas",
        description="Compatibility-aware, hardware-aware NAS for heterogeneous visual search: "
        "a small edge query model whose embeddings search an index built by a large gallery "
        "model (CMP-NAS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              hwnas run configs/quickstart.yaml      # the whole pipeline on Fashion-MNIST
              hwnas data --dataset omniglot --protocol open
              hwnas space --sample 3
            """),
    )
    ap.add_argument("--version", action="version", version=f"hwnas {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_,
                              epilog=textwrap.dedent(EXAMPLES[name]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("data", "Load a data set, make the protocol's splits and record them in the run directory.")
    _add_common(p)
    _add_data_flags(p)

    p = add("space", "Show the query search space: widths, choices, hash, FLOPs range; cost of an arch.")
    p.add_argument("--config", help="YAML/JSON config file")
    _add_set(p)  # e.g. --set space.width_mult=1.0, to see another space before writing it down
    p.add_argument("--arch", help="an arch string to cost")
    p.add_argument("--sample", type=int, default=0, help="also show N random archs")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")

    p = add("profile", "Build a per-op latency table for the search space on a device; validate it end to end.")
    _add_common(p)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: ONNX Runtime CPU (edge queries); gpu: TensorRT or torch-cuda")
    p.add_argument("--backend", choices=["onnxruntime-cpu", "torch-cuda", "tensorrt"],
                   help="force one backend")
    p.add_argument("--threads", type=int,
                   help="intra-op threads (default: the config's latency.threads, else physical cores)")
    p.add_argument("--compare-threads", type=int, nargs="*", metavar="N",
                   help="only time a few subnets of the space at each of these thread counts "
                        "(default 1 up to the physical cores) and recommend one for latency.threads")
    p.add_argument("--out", help="table path (default: the config's latency.table for --device cpu, else "
                   "latency_tables/<machine>-<cpu model>-<cores>c-ort<ver>-fp32-t<threads>-r<size>-s<space hash>.json)")
    p.add_argument("--only-missing", action="store_true",
                   help="keep the table's entries, measure only missing ops (the default for an "
                   "existing table; named for scripts)")
    p.add_argument("--remeasure", action="store_true", help="discard an existing table, measure all")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="measure N random subnets end to end and record the predictor's error")
    p.add_argument("--calibrate", type=int, metavar="K",
                   help="archs measured end to end to fit the predictor's calibration (an offset, "
                        "a*sum+c, +b*weights, +d*layers: the best leave-one-out; with --validate; "
                        "40: at 32 px, 20 were too few to fit the weights term)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per op")
    p.add_argument("--runs", type=int, default=10, help="timed runs per op per round")
    p.add_argument("--gallery-throughput", action="store_true",
                   help="also time the run's gallery model at batch 1/32/256 (images/s)")

    p = add("search", "Search the supernet for the most compatible query arch within a latency budget (Optuna).")
    _add_common(p)
    p.add_argument("--budget-ms", type=float, help="edge latency budget (predicted from the table); default: "
                   "the config's, as hwnas run resolves it (search.budget_ms, else budget_speedup x faster "
                   "than the paragon, else budget_fraction of the table's range)")
    p.add_argument("--reward", choices=["r1", "r2", "r3"], help="r1 M(q,q), r2 M(q,g), r3 mix (default)")
    p.add_argument("--alpha", type=float, help="R3 weight of M(q,g) (default 0.5)")
    p.add_argument("--metric", help="accuracy metric: recall@1 (default), recall@5, recall@10, mAP, or "
                   "TAR@FAR=f (verification at false accept rate f, e.g. TAR@FAR=1e-3)")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random", "evolution"],
                   help="default: the config's search.sampler (tpe where unset)")
    p.add_argument("--n-trials", type=int, help="evaluated (within-budget) trials in the study")
    p.add_argument("--multi-objective", action=argparse.BooleanOptionalAction, default=None,
                   help="maximize the reward and minimize predicted latency; report the Pareto front "
                        "(--no-multi-objective: the reward alone, where the config sets search.multi_objective)")
    p.add_argument("--prefer-faster-within", type=_band, metavar="se|DIFF",
                   help="choose the fastest arch whose reward is within DIFF of the best (default se: "
                        "one standard error of the best reward on the validation queries; 0: the best)")
    p.add_argument("--pick-in-band", choices=PICKS_IN_BAND,
                   help="which arch of that band: the fastest (default) or the one with the most FLOPs")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://..., or "
                   "journal:PATH); default SQLite in the run directory")
    p.add_argument("--study-name", help="study name (default from reward, sampler and budget)")
    p.add_argument("--table", help="latency table (default: latency_tables/ for this space and CPU)")
    p.add_argument("--enqueue", action="append", default=[], metavar="ARCH",
                   help="evaluate this arch early in the study (repeatable)")
    p.add_argument("--sampler-seed", type=int, help="sampler seed (give each worker its own)")

    p = add("deploy", "Export query.onnx, gallery.onnx (+TensorRT), a FAISS index and manifest.json.")
    _add_common(p)
    p.add_argument("--out", help="bundle directory (default RUN_DIR/bundle)")
    p.add_argument("--query", help="query model directory (default RUN_DIR/query/searched, or "
                   "searched-adapted where adapt.epochs > 0)")
    p.add_argument("--gallery", help="gallery model directory (default RUN_DIR/gallery)")
    p.add_argument("--index", help="FAISS factory string, e.g. Flat, HNSW32, IVF1024,Flat "
                   "(default: deploy.index, else by gallery size)")
    p.add_argument("--catalog", metavar="SOURCE",
                   help="index these images instead of the test split's gallery part: a folder (any "
                   "depth), a .zip, or a CSV manifest with path and optional label columns "
                   "(default: deploy.catalog); the accuracy figures stay on the test split")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="leave unreadable images (the catalog's, or the split's gallery part) out, "
                   "counted, instead of stopping (data.skip_bad_images)")
    p.add_argument("--int8", action="store_true", help="also a static QDQ int8 query model "
                   "(on too where deploy.int8 is true)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (a folder "
                   "that holds anything else is refused); images hwnas-edge add put in it are embedded "
                   "again into the new one")
    p.add_argument("--drop-additions", action="store_true", help="with --overwrite: leave out the images "
                   "hwnas-edge add put in the bundle being replaced")

    p = add("verify", "Re-check a bundle: artifact hashes and ONNX parity.")
    p.add_argument("bundle", help="bundle directory")

    p = add("train-gallery", "Train the gallery model: a timm backbone + embedding head + cosine classifier.")
    _add_common(p)
    _add_resume(p)
    p.add_argument("--backbone", help="timm model name (e.g. resnet50)")
    p.add_argument("--backbone-checkpoint", help="initialize the backbone from your own timm "
                   "weights (safetensors, or a torch state dict read with weights_only=True)")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="with --backbone-checkpoint: train only the embedding head")

    p = add("train-supernet", "Train the SPOS supernet for compatibility with the frozen gallery model.")
    _add_common(p)
    _add_resume(p)

    p = add("train-query", "Train one fixed query model with the compatibility loss, then evaluate it.")
    _add_common(p)
    _add_resume(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="an arch string of the search space")
    src.add_argument("--timm", help="a timm model as a fixed baseline, e.g. mobilenetv3_small_050")
    src.add_argument("--from-search", action="store_true",
                     help="the arch of RUN_DIR/best_arch.json (the search's choice); with "
                          "query.finalists K > 1, the best by training loss of that and the "
                          "search's next best archs, K in all, after query.finalist_epochs epochs each")
    p.add_argument("--name", help="name of the model directory under RUN_DIR/query/")
    p.add_argument("--no-inherit", action="store_true",
                   help="train the arch from scratch instead of from the supernet's weights")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="with --from-search: train N of the finalists at once, each in its own "
                        "process with its own copy of the images (query.jobs)")

    p = add("adapt", "Fine-tune a trained query model on the gallery's images (no labels), "
            "then evaluate it.")
    _add_common(p)
    _add_resume(p)
    p.add_argument("--query", help="the trained query model (default RUN_DIR/query/searched)")
    p.add_argument("--images", help="the images your index holds: a folder, .zip or CSV manifest "
                   "(default: adapt.images, else deploy.catalog, else the split's gallery part)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the config's adapt.epochs, "
                   "or 15 where that is 0, i.e. off)")
    p.add_argument("--name", help="model directory under RUN_DIR/query/ (default QUERY-adapted)")

    p = add("evaluate", "Report M(g,g), M(q,g), M(q,q) (recall@1/5, mAP) for a query model.")
    _add_common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", help="a trained query model directory")
    src.add_argument("--arch", help="a subnet of the trained supernet (BN recalibrated)")
    p.add_argument("--part", choices=["test", "val"], default="test", help="which split (default test)")
    p.add_argument("--far", type=_far, action="append", default=[], metavar="F",
                   help="also verification: TAR at false accept rate F over all query-gallery pairs "
                        "(repeatable, e.g. --far 1e-3 --far 1e-4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = add("run", "Run the pipeline end to end from a config, step by step (resumable).")
    p.add_argument("config", nargs="?", help="YAML/JSON config file, e.g. configs/quickstart.yaml")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG",
                   help="the config given as the other commands take it (the same as CONFIG)")
    p.add_argument("--run-dir", help="override the config's run directory")
    _add_set(p)  # a step whose config it changes is done again
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip (and count) unreadable images instead of stopping (data.skip_bad_images)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="train N of the finalists and baselines at once, each in its own process "
                        "with its own copy of the images (query.jobs; on a CPU, small models "
                        "trained side by side finish sooner than one after another)")
    p.add_argument("--from", dest="redo_from", metavar="STEP",
                   help="do STEP and every step that builds on it again (steps whose config "
                        "changed are done again anyway); STEP: data, profile, train-gallery, "
                        "train-supernet, search, train-query, adapt, baselines, deploy, report")
    p.add_argument("--drop-additions", action="store_true",
                   help="a deploy step done again leaves out the images hwnas-edge add put in the "
                        "run's bundle (by default they go into the new one)")
    return ap


def apply_sets(cfg, sets) -> None:
    """``--set a.b.c=value``: walk dataclasses and dicts, assign the YAML-parsed value."""
    import dataclasses

    import yaml

    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise HwnasError(f"--set {item!r}: expected KEY=VALUE, e.g. supernet.train.epochs=5")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise HwnasError(f"--set {item!r}: the value is not valid YAML ({e.__class__.__name__}); "
                             "quote it, e.g. --set 'data.unlabeled=[a.zip, b.zip]'") from None
        obj, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(obj):
                names = [f.name for f in dataclasses.fields(obj)]
                if part not in names:
                    raise HwnasError(f"--set {key}: {'.'.join(parts[:i]) or 'config'} has no key "
                                     f"{part!r}; valid keys: {names}")
                if last:
                    if dataclasses.is_dataclass(getattr(obj, part)):
                        raise HwnasError(f"--set {key}: {key} is a section; set one of its keys, "
                                         f"e.g. --set {key}.{dataclasses.fields(getattr(obj, part))[0].name}=...")
                    from hwnas.fields import checked_fields

                    value = checked_fields(type(obj), {part: value}, ".".join(parts[:i]))[part]
                    # (the section's own checks run once every --set is in: Config.validate;
                    # one at a time, a pair that must change together would be refused)
                    setattr(obj, part, value)
                else:
                    nxt = getattr(obj, part)
                    if nxt is None:
                        nxt = {}
                        setattr(obj, part, nxt)
                    obj = nxt
            elif isinstance(obj, dict):
                if last:
                    obj[part] = value
                else:
                    obj = obj.setdefault(part, {})
            else:
                raise HwnasError(f"--set {key}: {'.'.join(parts[:i])} is not a section")


def _load(args):
    from hwnas.config import load_config

    cfg = load_config(getattr(args, "config", None))
    apply_sets(cfg, getattr(args, "set", []))
    given = ["--set"] if getattr(args, "set", None) else []  # the flags that changed the config

    def flag(name: str, set_it) -> None:
        v = getattr(args, name, None)
        if v is not None and (v or name != "protocol"):  # ("" run_dir too: validate() names it)
            set_it(v)
            given.append(f"--{name.replace('_', '-')}")

    flag("run_dir", lambda v: setattr(cfg, "run_dir", v))
    d = cfg.data
    for name in ("dataset", "data_dir", "skip_bad_images"):
        flag(name, lambda v, name=name: setattr(d, name, v))
    flag("jobs", lambda v: setattr(cfg.query, "jobs", v))
    flag("protocol", lambda v: setattr(d, "split", {**d.split, "protocol": v}))
    flag("seed", lambda v: setattr(d, "split", {**d.split, "seed": v}))
    try:
        return cfg.validate()
    except HwnasError as e:  # name the config file, and the flags that changed its settings
        path = getattr(args, "config", None)
        if path is None or str(e).startswith(str(path)):
            raise
        with_flags = f" (with {', '.join(given)})" if given else ""
        raise type(e)(f"{path}{with_flags}: {e}") from None


def cmd_data(args) -> int:
    from hwnas.report import format_table
    from hwnas.rundir import RunDir

    from hwnas.data.splits import no_validation_reason

    cfg = _load(args)
    rd = RunDir(cfg)
    col = rd.collection()
    made = not rd.splits_path.exists()
    s = rd.splits(col, save=False)  # a new split is kept only once its images are read
    rd.check_images(s)  # every image read once now, not first by the step that needs it
    if made:
        rd.save_splits(s)
    rd.save_config()
    rows = [[p, c["images"], c["classes"]] for p, c in s.counts().items()]
    print(f"data set {col.name}: {len(col)} images, {col.num_classes} classes "
          f"(protocol {s.config.protocol}, seed {s.config.seed}, query_mode {s.config.query_mode})")
    print(format_table(["part", "images", "classes"], rows))
    print(f"splits: {rd.splits_path}")

    why = no_validation_reason(s)
    if why:
        print(f"WARNING: {why} (`hwnas search` and `hwnas run` stop on it)", file=sys.stderr)
    return 0


def cmd_space(args) -> int:
    import json

    from hwnas.report import format_table
    from hwnas.space import arch_flops, arch_params

    sp = _load(args).search_space()
    if args.sample < 0:
        raise HwnasError(f"--sample {args.sample} must be 0 or more (random archs to show)")
    if args.arch is not None and not args.arch.strip():
        raise HwnasError("--arch is empty; give an arch string, e.g. from `hwnas space --sample 1`")
    if args.json and (args.arch or args.sample):
        raise HwnasError("--json prints the space itself; drop --arch/--sample, or drop --json "
                         "for the table of archs")
    given = sp.parse(args.arch) if args.arch else None  # (a bad arch fails before anything prints)
    if args.json:
        print(json.dumps({**sp.to_dict(), "hash": sp.hash}, indent=2))
        return 0
    print(f"search space {sp.name!r} (hash {sp.hash}): input {sp.input_size}x{sp.input_size}x"
          f"{sp.in_channels}, embed_dim {sp.embed_dim}, {sp.num_layers} layers, "
          f"{sp.num_archs():.3g} archs")
    rows = []
    for s, (n, w) in enumerate(zip(sp.stage_layers, sp.widths())):
        layer = [x for x in sp.layers() if x.stage == s][0]
        rows.append([s, n, w, f"{layer.in_size}->{layer.out_size}",
                     f"{sp.mid_channels(layer, min(sp.channel_scales))}..{sp.max_mid_channels(layer)}"])
    print(format_table(["stage", "layers", "width", "size", "mid channels"], rows))
    print(f"ops per layer: {', '.join(sp.ops)}{' + skip (stride-1 layers)' if sp.allow_skip else ''};"
          f" channel scales {', '.join(f'{c:g}' for c in sp.channel_scales)}")
    archs = [("smallest", sp.smallest()), ("largest", sp.largest())]
    archs += [(f"random {i}", sp.sample(i)) for i in range(args.sample)]
    if given is not None:
        archs.append(("given", given))
    rows = [[name, f"{arch_flops(sp, a) / 1e6:.2f}", f"{arch_params(sp, a) / 1e6:.3f}",
             a.to_string(sp)] for name, a in archs]
    print(format_table(["arch", "MFLOPs", "Mparams", "string"], rows))
    lo, hi = arch_flops(sp, sp.smallest()), arch_flops(sp, sp.largest())
    print(f"FLOPs range: {hi / lo:.1f}x (largest / smallest)")
    return 0


def cmd_profile(args) -> int:
    from pathlib import Path

    from hwnas.latency.backends import get_backend, physical_cores, thread_options
    from hwnas.latency.profile import compare_threads, gallery_throughput, profile_space, validate_table
    from hwnas.latency.table import LatencyTable
    from hwnas.report import format_table

    cfg = _load(args)
    if args.only_missing and args.remeasure:
        raise HwnasError("--only-missing and --remeasure contradict each other; pick one")
    for flag, v, least in (("--rounds", args.rounds, 1), ("--runs", args.runs, 1),
                           ("--validate", args.validate, 0), ("--threads", args.threads, 0),
                           ("--calibrate", args.calibrate, 2)):
        if v is not None and v < least:
            raise HwnasError(f"{flag} {v} must be at least {least}"
                             + (" (0 or omitted: the physical core count)" if flag == "--threads" else "")
                             + (" (the smallest and the largest subnet)" if flag == "--calibrate" else ""))
    if 0 < args.validate < 3:
        raise HwnasError(f"--validate {args.validate}: rank correlations need at least 3 subnets "
                         "measured end to end (e.g. --validate 30), or 0 for none")
    if args.calibrate is not None and not args.validate:
        raise HwnasError("--calibrate sets how many archs fit the predictor when --validate checks the "
                         "table; give --validate N with it (e.g. --validate 30 --calibrate 40)")
    space = cfg.search_space()
    if args.compare_threads is not None:
        if args.device != "cpu":
            raise HwnasError("--compare-threads is for --device cpu (ONNX Runtime intra-op threads)")
        # it writes nothing: the flags that shape a table have nothing to act on
        ignored = [f for f, on in (("--out", args.out), ("--threads", args.threads is not None),
                                   ("--validate", args.validate), ("--calibrate", args.calibrate is not None),
                                   ("--remeasure", args.remeasure), ("--only-missing", args.only_missing),
                                   ("--gallery-throughput", args.gallery_throughput), ("--backend", args.backend))
                   if on]
        if ignored:
            raise HwnasError(f"--compare-threads only times a few subnets at each thread count and writes "
                             f"nothing, so {', '.join(ignored)} would do nothing; build the table without "
                             "--compare-threads to use them")
        c = compare_threads(space, args.compare_threads or thread_options(physical_cores()),
                            rounds=args.rounds, runs=args.runs)
        ts = [str(t) for t in c["threads"]]
        print(format_table(["subnet"] + [f"{t} thr ms" for t in ts],
                           [[a if len(a) <= 48 else a[:45] + "..."] + [f"{v[t]:.4f}" for t in ts]
                            for a, v in c["archs"].items()]
                           + [["geometric mean"] + [f"{c['geomean_ms'][t]:.4f}" for t in ts]]))
        print(f"fastest for {c['fastest_count'][str(c['recommended'])]} of {len(c['archs'])} subnets: "
              f"{c['recommended']} thread(s); set latency.threads: {c['recommended']} (or "
              f"--threads {c['recommended']}) and build the table with it")
        return 0
    threads = args.threads if args.threads is not None else cfg.latency.threads
    backend = get_backend(args.device, args.backend, threads)
    # where the table goes: --out, else the config's latency.table (the CPU table the search and
    # hwnas run read) where this is that table's timing, else latency_tables/ under a name of
    # the machine, the settings and the space
    own = args.device == "cpu" and args.backend in (None, "onnxruntime-cpu") and threads == cfg.latency.threads
    flag = "--out" if args.out else "latency.table" if cfg.latency.table and own else None
    if cfg.latency.table and not own and not args.out:
        print(f"[profile] not the config's latency.table ({cfg.latency.table}: ONNX Runtime on the CPU at "
              f"latency.threads {cfg.latency.threads}): this table goes under latency_tables/")
    if flag is None:
        out = Path("latency_tables") / LatencyTable.default_name(backend.settings(), space)
    else:  # a path of the user's: checked now, not after minutes of timing
        import tempfile

        out = Path(args.out or cfg.latency.table)
        if flag == "latency.table":
            print(f"[profile] the config's latency.table: {out}")
        if out.is_dir():
            raise HwnasError(f"{flag} {out} is a folder; give the table's file path (e.g. {out / 'table.json'})")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out.parent).close()
        except OSError as e:
            raise HwnasError(f"{flag} {out}: cannot write in {out.parent} ({e.strerror or e}); give a path "
                             "in a folder you can write") from None
    table = profile_space(space, backend, out, remeasure=args.remeasure, rounds=args.rounds,
                          runs=args.runs)
    if args.validate:
        validate_table(space, table, backend, args.validate, out,
                       calibrate=40 if args.calibrate is None else args.calibrate,
                       seed=cfg.seed)
    if args.gallery_throughput:
        from hwnas.compat.api import RunDir, run_gallery
        from hwnas.data.images import Preprocess

        g = run_gallery(RunDir(cfg))
        tp = gallery_throughput(g.net, Preprocess.from_dict(g.config["preprocess"]), backend)
        table.header["gallery_throughput"] = {"fingerprint": g.fingerprint,
                                              "backbone": g.config["backbone"], **tp}
        table.save(out)
        print("gallery images/s: " + ", ".join(f"batch {b}: {v['images_per_s']:.0f}" for b, v in tp.items()))
    print(f"table: {out}")
    return 0


def _far(text: str) -> float:
    """--far: a false accept rate, 0 < F < 1."""
    from hwnas.config import parse_far

    f = parse_far(text)
    if f is None:
        raise argparse.ArgumentTypeError(f"must be a rate between 0 and 1, e.g. 1e-3, not {text!r}")
    return f


def _band(text: str) -> float | str:
    """--prefer-faster-within: "se" or a number (checked by the search config)."""
    if text == "se":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither \"se\" nor a number") from None


def cmd_search(args) -> int:
    from hwnas.search.runner import run_search

    cfg = _load(args)
    s = cfg.search
    for flag in ("budget_ms", "reward", "alpha", "metric", "sampler", "n_trials", "multi_objective",
                 "prefer_faster_within", "pick_in_band", "storage", "study_name"):
        v = getattr(args, flag)
        if v is not None:
            setattr(s, flag, v)
    if args.table:
        cfg.latency.table = args.table
    s.check()  # the flags, before the budget's resolution times the paragon
    if args.sampler_seed is not None and not 0 <= args.sampler_seed < 2 ** 32:
        raise HwnasError(f"--sampler-seed {args.sampler_seed} must be a whole number from 0 to 2**32 - 1")
    adopt = None
    if s.budget_ms is None:  # the config's budget, resolved (and kept) as hwnas run does
        from hwnas.pipeline import adopt_study_budget, set_search_budget

        info = set_search_budget(cfg)
        rule = (f"{s.budget_speedup:g}x faster than the paragon (search.budget_speedup)" if s.budget_speedup
                else f"search.budget_fraction {s.budget_fraction:g} of the table's range")
        c = info.get("clamped_from_ms")
        if c is not None:
            rule += (f", clamped from {c:.4f} ms: " + (
                "above the slowest subnet, so every subnet is that much faster and the budget constrains "
                "nothing" if c > s.budget_ms else "below the fastest subnet, so the speed-up is not reached"))
        print(f"[search] budget {s.budget_ms} ms: {rule}; --budget-ms sets another")
        if s.budget_speedup:  # a measured budget: a worker joins the study's
            adopt = lambda b: adopt_study_budget(cfg, b)  # noqa: E731
    run_search(cfg, seed=args.sampler_seed, enqueue=args.enqueue or (), adopt_budget=adopt)
    return 0


def cmd_deploy(args) -> int:
    from hwnas.export.deploy import deploy

    cfg = _load(args)  # the config's deploy settings, as hwnas run takes them; the flags add to them
    deploy(cfg, out=args.out, query=args.query, gallery=args.gallery, factory=args.index or cfg.deploy.index,
           int8=args.int8 or cfg.deploy.int8, overwrite=args.overwrite, catalog=args.catalog,
           drop_additions=args.drop_additions)
    return 0


def cmd_verify(args) -> int:
    import json

    from hwnas_edge.bundle import BundleError, verify

    try:
        print(json.dumps(verify(args.bundle), indent=2))
    except BundleError as e:
        raise HwnasError(str(e)) from None
    return 0


def cmd_train_gallery(args) -> int:
    from hwnas.compat.api import train_gallery

    cfg = _load(args)
    g = cfg.gallery
    if args.backbone:
        g.backbone = args.backbone
    if args.backbone_checkpoint is not None:  # ('' too: an unset variable, refused)
        from hwnas.config import checkpoint_path

        g.backbone_checkpoint = checkpoint_path(args.backbone_checkpoint, "--backbone-checkpoint")
    if args.freeze_backbone:
        g.freeze_backbone = True
    train_gallery(cfg, resume=args.resume, restart=args.restart)
    return 0


def cmd_train_supernet(args) -> int:
    from hwnas.compat.api import train_supernet

    train_supernet(_load(args), resume=args.resume, restart=args.restart)
    return 0


def cmd_train_query(args) -> int:
    from hwnas.compat.api import evaluate_query, evaluation_table, train_query
    from hwnas.compat.train import is_main

    cfg = _load(args)
    if args.jobs is not None and (not args.from_search or cfg.query.finalists <= 1):
        raise HwnasError("--jobs trains the finalists side by side: it goes with --from-search "
                         "and query.finalists > 1; one model trains in one process")
    if args.from_search:
        from hwnas.compat.api import train_searched

        if args.no_inherit:
            cfg.query.inherit = False
        q = train_searched(cfg, name=args.name or "searched", resume=args.resume, restart=args.restart)
    else:
        q = train_query(cfg, arch=args.arch, timm_name=args.timm, name=args.name, resume=args.resume,
                        restart=args.restart, inherit=False if args.no_inherit else None)
    if is_main():
        from pathlib import Path

        res = evaluate_query(cfg, query_dir=str(Path(cfg.run_dir) / "query" / q["name"]))
        print(evaluation_table(res))
    return 0


def cmd_adapt(args) -> int:
    from hwnas.compat.api import adapt_query, evaluate_query, evaluation_table
    from hwnas.compat.train import is_main

    cfg = _load(args)
    if args.epochs is not None:
        cfg.adapt.epochs = args.epochs
    elif cfg.adapt.epochs == 0:  # off in the config: asking for it on the command line turns it on
        cfg.adapt.epochs = 15
    if args.images:
        cfg.adapt.images = args.images
    cfg.adapt.__post_init__()  # checks --epochs as the config's own values are checked
    q = adapt_query(cfg, query=args.query, name=args.name, resume=args.resume, restart=args.restart)
    if is_main():
        from pathlib import Path

        res = evaluate_query(cfg, query_dir=str(Path(cfg.run_dir) / "query" / q["name"]))
        print(evaluation_table(res))
    return 0


def cmd_evaluate(args) -> int:
    import json

    from hwnas.compat.api import evaluate_query, evaluation_table

    res = evaluate_query(_load(args), query_dir=args.query, arch=args.arch, part=args.part, fars=args.far)
    # (each query's rank-1 hit, a character per query, stays in evaluation-PART.json)
    shown = {k: v for k, v in res.items() if k != "hit@1"}
    print(json.dumps(shown, indent=2) if args.json else evaluation_table(res))
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from hwnas.pipeline import run_pipeline

    if args.config and args.config_flag and Path(args.config).resolve() != Path(args.config_flag).resolve():
        raise HwnasError(f"two configs given ({args.config} and --config {args.config_flag}); give one")
    args.config = args.config or args.config_flag
    if not args.config:
        raise HwnasError("hwnas run needs a config: hwnas run configs/quickstart.yaml (or your own)")
    return run_pipeline(_load(args), redo_from=args.redo_from, drop_additions=args.drop_additions)


COMMANDS = {"data": cmd_data, "space": cmd_space, "profile": cmd_profile, "search": cmd_search, "deploy": cmd_deploy, "verify": cmd_verify, "train-gallery": cmd_train_gallery,
            "train-supernet": cmd_train_supernet, "train-query": cmd_train_query,
            "adapt": cmd_adapt, "evaluate": cmd_evaluate, "run": cmd_run}


# the commands that train under torchrun (DistributedDataParallel, one process writing)
DIST_COMMANDS = ("train-gallery", "train-supernet", "train-query", "adapt")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill's default signal, a scheduler's or a container's stop), raised as Ctrl-C
    is: half-written files are removed, a search's trial is failed (and queued again when the
    search resumes) and locks are let go, where SIGTERM's default would end the process as a
    kill does and leave them."""


def _terminate(signum, frame):
    raise Terminated()


def _after_interrupt(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl-C, or SIGTERM: :class:`Terminated`) ``e`` was raised while it was
    being handled, or ``e`` itself where it is one; None for any other error. A library's
    clean-up that fails on the way out (Optuna's trial bookkeeping, interrupted between two
    of its steps, raises an UnboundLocalError over the KeyboardInterrupt) is the interrupt,
    not a bug."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__context__ or e.__cause__
    return None


def _os_problem(e: BaseException) -> str | None:
    """What an OS error of the machine's (a path not allowed or not a folder, a read-only or
    full disk) says to the user, with the fix; None for any other error (a bug's keeps its
    traceback)."""
    import errno

    if not isinstance(e, OSError):
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # (a write() names no file)
        where = f" writing {e.filename}" if e.filename else ""
        return f"the disk is full{where} ({e.strerror}); free some space, or give a run directory elsewhere (--run-dir)"
    if e.filename is not None and e.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS):
        return (f"cannot access {e.filename}: {e.strerror}; check that path (a folder, readable, and "
                "writable where hwnas writes: the run directory, --run-dir)")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    from hwnas.utils import env_world_size

    try:
        world = env_world_size()
    except HwnasError as e:
        print(f"hwnas {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command not in DIST_COMMANDS and world > 1:
        # every process would do the whole command: each writing, deleting and timing the same
        # files (hwnas run's redo deletes a changed step's outputs) — refused before any of it
        print(f"hwnas {args.command}: error: it runs as one process, not under torchrun "
              f"(WORLD_SIZE={world}); only {', '.join(DIST_COMMANDS)} train on several: run "
              f"`hwnas {args.command}` without torchrun", file=sys.stderr)
        return 2
    if world > 1 and os.environ.get("RANK", "0") not in ("", "0"):
        # under torchrun the first process speaks for all (each printed every line); errors
        # from any process still reach stderr
        sys.stdout = open(os.devnull, "w")
    import signal
    import threading

    on_term = None  # (main() called from a program that set its own SIGTERM handler keeps it)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        on_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args) or 0
    except HwnasError as e:
        print(f"hwnas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # (| head)
        from hwnas_edge.bundle import reader_gone, stdout_gone

        if not stdout_gone():
            raise
        return reader_gone()
    except (KeyboardInterrupt, Exception) as e:  # (after the pipe's: a BrokenPipeError is an Exception)
        problem = _os_problem(e)
        if problem and not _after_interrupt(e):
            # a path it cannot use (a run directory under a file, no permission, a read-only
            # or full disk): the path and the fix, not a traceback
            print(f"hwnas {args.command}: error: {problem}", file=sys.stderr)
            return 2
        stop = _after_interrupt(e)  # (Ctrl-C or SIGTERM, or an error raised while it unwound)
        if stop is None:
            raise
        print(f"hwnas {args.command}: {'terminated' if isinstance(stop, Terminated) else 'interrupted'} "
              "(finished work is kept; run it again to resume)", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    sys.exit(main())
