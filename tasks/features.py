"""Step 3, features: train the classifier whose features FID and KID are computed in.

    python -m tasks.features [--params params.yaml]

Image data with fidelity.extractor = "classifier" needs labels; "inception" needs nothing
trained (a local weights file); 2-D point sets are scored with swd / mmd instead.
Writes outputs/features/feature_net.safetensors (when trained) and summary.json.
"""

from __future__ import annotations

import sys

from boss_core.features import save_feature_net, train_feature_net

from .runtime.artifacts import check_classifier_labels, dataset_file, is_image_data, load_prepared
from .runtime.io import write_json
from .runtime.step import StepContext, main, prefect_task

NAME, SECTIONS = "features", ("data", "features", "fidelity")


def run(ctx: StepContext) -> dict:
    data = load_prepared(ctx.ws)
    out = ctx.ws.step(NAME)
    if not is_image_data(data.data_shape):
        summary = {"score": "swd_mmd", "reason": f"data_shape {list(data.data_shape)} is not "
                   "an image; scored with sliced Wasserstein and MMD"}
    elif ctx.params.fidelity.extractor == "inception":
        summary = {"score": "fid_kid", "extractor": "inception"}
    else:
        check_classifier_labels(ctx.params, data, str(dataset_file(ctx.ws)))  # as prepare
        out.mkdir(parents=True, exist_ok=True)
        result = train_feature_net(data.x, data.y, ctx.params.features)
        save_feature_net(result.net, out / "feature_net.safetensors")
        summary = {"score": "fid_kid", "extractor": "classifier",
                   "heldout_accuracy": result.heldout_accuracy,
                   "train_seconds": result.wall_time_s}
        ctx.log_metrics({"heldout_accuracy": result.heldout_accuracy})
    write_json(out / "summary.json", summary)
    return summary


task = prefect_task(NAME, run, SECTIONS)

if __name__ == "__main__":
    sys.exit(main(NAME, run, SECTIONS, __doc__))
