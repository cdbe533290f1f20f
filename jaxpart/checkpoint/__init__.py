"""Checkpoints for any Plan: orbax save and restore, a checked manifest, conversion between
placements, and npz import and export.

A checkpoint is a directory:
  manifest.json  model config, run shape, the Plan it was saved under (null: unsharded), the
                 layout, per leaf its shape, dtype and checksum, and the files under orbax/
                 with their sizes (and the metadata files' sha256) as written.
  orbax/         an orbax CheckpointManager root: step 0 with the items `params` and, when
                 saved, `opt_state`.

One job per module, lowest first:
  schema      CheckpointError, and the manifest's structure checked key by key
  inventory   the files orbax wrote: recorded at save, checked before every read
  manifest    leaf paths, layouts (stacked, per_layer, per_stage), the manifest and its reading
  bars        progress bars
  digest      sharding-independent checksums and the check of restored leaves against them;
              NaN/Inf counted on the devices (refused unless allow_nonfinite)
  placement   the target Plan's shardings, and the rules a Plan must meet for this model
  atomic      write into a hidden sibling, rename into place at the end
  npz         npz import and export
  orbax_io    save and restore a directory with orbax
  conversion  load any source, convert between placements and containers
The names below are the public interface; import them from jaxpart.checkpoint.
"""

from jaxpart.checkpoint.atomic import check_destination
from jaxpart.checkpoint.conversion import convert, load, source_plan_if_present
from jaxpart.checkpoint.digest import checksum, checksums
from jaxpart.checkpoint.hf_io import export_hf, import_hf, is_hf_dir
from jaxpart.checkpoint.manifest import (CHECKSUM_ALGO, FORMAT, LAYOUTS, MANIFEST,
                                         NPZ_MANIFEST_KEY, ORBAX_DIR, ORBAX_LAYOUTS, SENTINEL,
                                         UNSHARDED, VERSION, CheckpointError, Manifest, Restored,
                                         check_model, flatten, infer_layout, join_leaf,
                                         npz_manifest, placement_name, read_manifest,
                                         split_leaf, stored_keys, unflatten)
from jaxpart.checkpoint.npz import export_npz, load_npz
from jaxpart.checkpoint.orbax_io import restore, save
from jaxpart.checkpoint.placement import check_plan, param_shardings, param_targets, place

__all__ = [
    "CHECKSUM_ALGO", "FORMAT", "LAYOUTS", "MANIFEST", "NPZ_MANIFEST_KEY", "ORBAX_DIR",
    "ORBAX_LAYOUTS", "SENTINEL", "UNSHARDED", "VERSION", "CheckpointError", "Manifest",
    "Restored", "check_destination", "check_model", "check_plan", "checksum", "checksums",
    "convert", "export_hf", "export_npz", "flatten", "import_hf", "is_hf_dir", "infer_layout", "join_leaf", "load", "load_npz",
    "npz_manifest", "param_shardings", "param_targets", "place", "placement_name",
    "read_manifest", "restore", "save", "source_plan_if_present", "split_leaf", "stored_keys",
    "unflatten",
]
