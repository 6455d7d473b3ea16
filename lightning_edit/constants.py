"""File and folder names, spelled once (what a run folder, an edit state and a checkpoint hold)."""

# A run folder (`run edit`, `run sae`, ...): runs/<job>/<stamp>/ unless output_dir says otherwise.
RUN_CONFIG = "config.yaml"
"""The resolved config of the run."""
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
EDIT_STATE_DIR = "edit_state"
"""Where `run edit` saves its edit state (`lightning_edit.editors.state`)."""

# An edit state folder.
EDITOR_JSON = "editor.json"
"""The method, its hyperparameters, the base model and component it was built over."""
STATE_JSON = "state.json"
"""`editor.state_dict()` with every tensor replaced by a reference into TENSORS_FILE."""
TENSORS_FILE = "tensors.safetensors"
LEDGER_JSON = "ledger.json"
COMPONENT_EXPORT_DIR = "sae"
"""The edited sparse component in sparsify layout (`<state>/sae/<hookpoint>/`), for editors that export one."""

# A sparse coder checkpoint folder (one hookpoint).
CODER_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"
"""A SAELens checkpoint's input scale (folded into the weights on load)."""

# An activation cache (lightning_edit.sparse.activation_cache): <root>/<key>/manifest.json and
# <root>/<key>/shard-NNNNN/{offsets.npy, <hookpoint>.x.npy, <hookpoint>.y.npy}.
ACTIVATION_MANIFEST = "manifest.json"
"""What the cache key was made of, the shard size, the widths and the dtype."""
ACTIVATION_OFFSETS = "offsets.npy"
"""Written last into a shard: its presence marks a whole shard."""

# An embedded world's folder (lightning_edit.world).
WORLD_JSON = "world.json"
"""The knowledge base."""
WORLD_ACCURACY = "accuracy.json"
"""Written last: a world folder holding it is complete."""
WORLD_CORPUS = "corpus.txt"
WORLD_ZSRE = "zsre.json"
WORLD_COUNTERFACT = "counterfact.json"
WORLD_MC_DIR = "mc"

# `run edit`'s results (lightning_edit.results): results.json, .csv, .md and .png.
RESULTS_STEM = "results"
RESULTS_JSON = f"{RESULTS_STEM}.json"

# Summaries and exports in a run folder.
SUMMARY_MD = "summary.md"
"""The final table of the `sae` / `transcoder` jobs and of `calibrate`."""
SUMMARY_JSON = "summary.json"
EXPORT_DIR = "export"
"""Where the `sae` / `transcoder` jobs export their coders (sparsify layout) unless export_dir says otherwise."""
REPORT_JSON = "report.json"
"""`calibrate`'s statistics."""
REPORT_PLOT = "ard_diagnostics.png"
