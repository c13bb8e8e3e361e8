"""#12 on v4: `irece bench conditioning` with another conditioning reader (the bench reads with IreceConfig's default,
"erased"). Usage: conditioning_reader.py READER OUT.json   (READER: erased, standard or both)"""
import json
import sys
from dataclasses import replace

from benchmarks import conditioning, crr
from miniworld.assets import MODEL_DIR

reader, out = sys.argv[1], sys.argv[2]
real = crr.defence_config
conditioning.defence_config = lambda d, c, s: replace(real(d, c, s), conditioning_unet=reader)
s = crr.BenchSettings(n=16, t_star=0.5, threshold=0.305)
res = conditioning.run(str(MODEL_DIR), "star", ("uce", "esd-x", "esd-u", "receler"), s)
open(out, "w").write(json.dumps(res))
print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
