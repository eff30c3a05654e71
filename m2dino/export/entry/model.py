"""FM_UIA 2026 challenge entry: an M2DINO predictor written by `python -m m2dino.export`.

    python model.py                      # predict /input/ into /output/ (the image's command)
    python model.py DATA_ROOT OUT_DIR    # any other folders

Model() loads the weights and its settings (predictor.json) from this file's folder;
Model().predict(data_root, output_dir, batch_size) writes the challenge's submission format:
the three prediction JSON files and the segmentation index PNGs at each mask_path without its
leading ../ (plus missing_tasks.json listing rows of tasks this model has no head for). It is a
thin wrapper over m2dino.evaluation.predict.predict_folder, the code behind
`python -m m2dino.predict`: both write the same files for the same checkpoint and data.
"""
import json
import sys
from pathlib import Path

from m2dino.evaluation.predict import predict_folder, run_prediction
from m2dino.models.m2dino import load_model

HERE = Path(__file__).resolve().parent
SETTINGS = HERE / "predictor.json"
DEFAULT_FOLDERS = ("/input/", "/output/")  # where the challenge mounts the data and collects the output


class Model:
    def __init__(self, device=None):
        """Load the weights from this folder; `device` (cpu, cuda, auto) overrides predictor.json."""
        self.settings = json.loads(SETTINGS.read_text(encoding="utf-8"))
        if device is not None:
            self.settings["device"] = device
        self.model = load_model(HERE / self.settings["checkpoint"])

    def predict(self, data_root, output_dir, batch_size=None):
        """Predict every CSV row under data_root/csv_files into output_dir; batch_size None:
        the exported default (predictor.json)."""
        s = self.settings
        return predict_folder(self.model, data_root, output_dir, batch_size=batch_size or s["batch_size"],
                              device=s["device"], amp=s["amp"], tta=s["tta"])


def main(argv):
    """`python model.py [DATA_ROOT [OUT_DIR]]`: the folders not given are the challenge's."""
    data_root, output_dir = (list(argv) + list(DEFAULT_FOLDERS)[len(argv):])[:2]
    return run_prediction(lambda: Model().predict(data_root, output_dir), "model.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
