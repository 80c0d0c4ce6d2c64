"""The run directory: what every command reads and writes.

``runs/<name>/`` holds ``config.json`` (the resolved config of the run), ``splits.json``
(the recorded split), and the artifacts of later steps. Commands find what earlier steps
produced here instead of taking a long list of flags.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from hwnas.config import Config
from hwnas.errors import DataError
from hwnas.utils import read_json, write_json


class RunDir:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.path = Path(cfg.run_dir)

    @property
    def splits_path(self) -> Path:
        return self.path / "splits.json"

    def collection(self):
        from hwnas.data.sources import load_source

        return load_source(self.cfg.data.dataset, self.cfg.data.data_dir)

    def splits(self, collection=None, create: bool = True, log=print, save: bool = True):
        """The run's splits: read ``splits.json`` if present (and check it was made with
        the same data and split config), else make and record them (``save=False``: make them
        only; :meth:`save_splits` records them once they are checked)."""
        from hwnas.data.splits import Splits, make_splits

        col = collection or self.collection()
        split_cfg = self.cfg.split_config()
        if self.splits_path.exists():
            d = read_json(self.splits_path)
            made, now = d.get("config") or {}, asdict(split_cfg)
            made_from = d.get("source", {}).get("name")
            if made != now or made_from != col.name:
                diffs = ([f"data {col.name} (made from {made_from})"] if made_from != col.name else []) + [
                    f"data.split.{k} {now.get(k)!r} (made with {made.get(k)!r})"
                    for k in sorted(set(now) | set(made)) if now.get(k) != made.get(k)]
                raise DataError(
                    f"{self.splits_path} was made with other data or split settings than this "
                    f"command's: {'; '.join(diffs)}. Give this command the settings it was made "
                    "with (the same --config; a split made by `hwnas data` flags needs them as "
                    "--set data.dataset=..., data.data_dir=..., data.split.KEY=...), or use a new "
                    "--run-dir; deleting that file splits again, and the run's trained models "
                    "would then be judged on other images"
                )
            return Splits.load(self.splits_path, col)
        if not create:
            raise DataError(f"{self.splits_path} does not exist; run `hwnas data` first")
        s = make_splits(col, split_cfg)
        if save:
            self.save_splits(s, log)
        return s

    def save_splits(self, s, log=print) -> None:
        s.save(self.splits_path)
        log(f"wrote {self.splits_path} (fingerprint {s.fingerprint})")

    def check_images(self, splits, log=print) -> list[str]:
        """Every image of ``splits`` read once (:func:`hwnas.data.splits.check_split_images`,
        skipping as ``data.skip_bad_images`` says). The data commands check a new split before
        they save it (``splits(save=False)``), so a data set with files fixed or removed splits
        afresh. The images of ``data.unlabeled`` are read here too, so a broken one stops the
        run at its data step rather than at train-supernet, after the gallery's training."""
        from hwnas.data.images import check_readable
        from hwnas.data.sources import unlabeled_images, unlabeled_specs
        from hwnas.data.splits import check_split_images
        from hwnas.data.synthetic import is_synthetic

        skipped = check_split_images(splits, self.cfg.data.skip_bad_images, log)
        for spec in unlabeled_specs(self.cfg.data.unlabeled) if self.cfg.data.unlabeled else ():
            if is_synthetic(spec):  # (drawn, not read)
                continue
            col = unlabeled_images(spec)
            what = f"data.unlabeled {spec}"
            bad = check_readable(col, range(len(col)), self.cfg.data.skip_bad_images, desc="check unlabeled",
                                 what=what, log=log)
            if len(bad) == len(col):
                raise DataError(f"{what}: none of its {len(col)} images can be read (e.g. {bad[0]}); fix "
                                "them, or leave the source out of data.unlabeled")
            if bad:
                log(f"[data] {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of {what} "
                    f"{'are' if len(bad) > 1 else 'is'} left out by the steps that train on it (e.g. {bad[0]})")
        return skipped

    def save_config(self) -> Path:
        return write_json(self.path / "config.json", self.cfg.to_dict())
