"""The measured run, in a child process whose working folder is an exported entry (run as
`python -c <this file's text> DATA_ROOT OUT_DIR DEVICE PASSES`, so that `import model` finds
the entry's model.py): a line `M2DINO-PASS i n seconds` after each pass, then one line
`M2DINO-MEASURE {json}` with the times, the peak memory and the machine's load.

The data is predicted 1 + PASSES times: the first pass carries the one-off warm-up of a fresh
process (lazy initialisation in torch), the others give the steady time per image; the load
average is read before the first timed pass and after the last, so a busy machine shows."""
import json
import os
import resource
import sys
import time


def main(data_root: str, out_dir: str, device: str, passes: int) -> None:
    t0 = time.perf_counter()
    import model  # the entry's model.py, from the working folder
    import torch
    t1 = time.perf_counter()
    predictor = model.Model(device=device)
    t2 = time.perf_counter()
    first = predictor.predict(data_root, out_dir + "/first")
    t3 = time.perf_counter()
    print(f"M2DINO-PASS 0 {passes} {t3 - t2:.3f}", flush=True)
    load_before = os.getloadavg()[0]
    again = []
    for i in range(passes):
        start = time.perf_counter()
        predictor.predict(data_root, out_dir + f"/again{i}")
        again.append(time.perf_counter() - start)
        print(f"M2DINO-PASS {i + 1} {passes} {again[-1]:.3f}", flush=True)
    print("M2DINO-MEASURE " + json.dumps({
        "import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "again_s": again,
        "rows": sum(first["counts"].values()), "counts": first["counts"],
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "load_average_before": load_before, "load_average": os.getloadavg()[0], "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
