"""Plan the bundled 7B-class models for 16 GB, 24 GB and 80 GB budgets and tabulate the recommendations.

Run: python benchmarks/plan_real_models.py

Each row is `lisa-tune plan --gpu BUDGET --model MODEL --json`; the check is that every recommended peak is below
the usable budget (budget minus the 5% margin).
"""

from __future__ import annotations

import json
import os
import subprocess

MODELS = ("llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b")
BUDGETS = ("16GB", "24GB", "80GB")


def main() -> None:
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    print(
        "| model | budget | gamma | micro-batch | seq | precision | ckpt | peak GB | usable GB | tokens/s (estimate) |"
    )
    print("|---|---|---:|---:|---:|---|---|---:|---:|---:|")
    for model in MODELS:
        for budget in BUDGETS:
            command = ["lisa-tune", "-q", "plan", "--gpu", budget, "--model", model, "--json"]
            result = subprocess.run(command, env=environment, capture_output=True, text=True)
            plan = json.loads(result.stdout)
            chosen = plan["recommended"]
            usable = plan["budget"]["usable_bytes"]
            if chosen is None:
                print(f"| {model} | {budget} | nothing fits (exit {result.returncode}): {'; '.join(plan['advice'])} |")
                continue
            assert chosen["predicted_peak_bytes"] <= usable
            print(
                f"| {model} | {budget} | {chosen['gamma']} | {chosen['micro_batch_size']} | "
                f"{chosen['sequence_length']} | {chosen['precision']} | "
                f"{'on' if chosen['gradient_checkpointing'] else 'off'} | {chosen['predicted_peak_bytes'] / 1e9:.2f} | "
                f"{usable / 1e9:.2f} | {chosen['estimated_tokens_per_second']:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
