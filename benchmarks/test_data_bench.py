"""Data loading throughput (samples/s): FM_UIA records from the synthetic suite through the
full training transform (decode, resize, ultrasound augmentation, normalisation), in the main
process and with DataLoader workers, at the CPU default size (64 px) and at 224 px. The
question it answers: do 2 CPU cores keep a small model fed?"""
import pytest
from torch.utils.data import DataLoader

from m2dino.data import FMUIADataset, MultiTaskBatchSampler, collate, ensure_synthetic, load_fmuia

SAMPLES = 256


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    root = ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "suite", scale=0.01, seed=0)
    data = load_fmuia(root, policy="error")
    return data.train, data.tasks


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("image_size", [64, 224])
def test_data_loading(measure, train_records, image_size, workers):
    records, tasks = train_records
    dataset = FMUIADataset(records, tasks, image_size=image_size, train=True)
    sampler = MultiTaskBatchSampler(dataset.task_of_index, batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)

    def load():
        seen = 0
        while seen < SAMPLES:
            for batch in loader:
                seen += batch["images"].shape[0]
                if seen >= SAMPLES:
                    break

    measure(f"data_loading {image_size}px", f"workers={workers}", load, items=SAMPLES, rounds=3)
