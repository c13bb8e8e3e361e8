import time, torch
from irece_runtime.loading import load_pipeline
pipe = load_pipeline("miniworld/models/shapes10")
b = pipe.backend; h = pipe.classifier_prompts(pipe.vocabulary)  # (11,77,D)
x = torch.randn(33, 4, 8, 8); t = torch.tensor(500)
def run(rows, calls):
    for _ in range(calls):
        b.eps("standard", x[:rows], t, h.repeat(3, 1, 1)[:rows])
for rep in range(3):
    res = {}
    for name, rows, calls in (("1 row", 1, 1), ("2 rows", 2, 1), ("11 rows", 11, 1), ("3 x 11 rows", 11, 3), ("33 rows", 33, 1)):
        t0 = time.perf_counter(); [run(rows, calls) for _ in range(10)]; res[name] = (time.perf_counter() - t0) / 10
    print({k: round(v * 1000, 1) for k, v in res.items()})
