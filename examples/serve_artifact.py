"""Compile SmolLM2-135M to an artifact, then serve it with the continuous-batching engine, printing each
answer as soon as its request finishes.

    python examples/serve_artifact.py [ARTIFACT_DIR]
"""

import sys
import tempfile

import fxforge
from fxforge.optimizer import DEFAULT_PASSES
from fxforge.runtime.sequence import SamplingParams

directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/smollm2"
fxforge.optimize(fxforge.load("smollm2-135m"), passes=DEFAULT_PASSES).save(directory)

engine = fxforge.Engine(directory)  # loads the artifact: its passes replayed, its weights read back
prompts = ["What is 7 * 6?", "Name a primary colour.", "What is the capital of France?"]
for output in engine.stream(prompts, SamplingParams(max_new_tokens=12)):
    print(f"[{output.request_id}] {prompts[output.request_id]!r} -> {output.text!r}", flush=True)
stats = engine.stats
print(f"{stats.generated_tokens} tokens in {stats.seconds:.1f}s ({stats.tokens_per_second:.1f} tokens/s)")
