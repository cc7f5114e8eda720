"""A user's own training script, as a custom job runs it: reads the job from the
environment, prints the progress protocol, and — to show that cancel stops the whole
process group — starts a child process of its own and records its pid."""

import argparse
import json
import os
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--sleep", type=float, default=0.2)
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()

out = os.environ["CYLLM_OUTPUT_DIR"]
spec = json.loads(os.environ["CYLLM_SPEC"])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(out, "child.pid"), "w") as f:
    f.write(str(child.pid))
print(
    f"training {os.environ['CYLLM_BASE_MODEL_ID']} on {os.path.basename(os.environ['CYLLM_DATASET'])}",
    flush=True,
)
print("a warning on stderr", file=sys.stderr, flush=True)
for step in range(1, args.steps + 1):
    time.sleep(args.sleep)
    print(
        json.dumps(
            {
                "event": "progress",
                "step": step,
                "total_steps": args.steps,
                "loss": 1.0 / step,
                "learning_rate": spec.get("learning_rate") or 0.1,
                "tokens_per_second": 100.0,
                "eta_s": (args.steps - step) * args.sleep,
            }
        ),
        flush=True,
    )
if args.fail:
    print(json.dumps({"event": "error", "message": "the script gave up on purpose"}), flush=True)
    sys.exit(3)
child.kill()
