"""`lora-rlhf`: the InstructGPT recipe on one shared 4-bit base.

Each command lives in its own module and is registered here with a one-line description and an example.
"""

from __future__ import annotations

import typer

from lora_rlhf_cli import (
    compare,
    dpo,
    eval,
    generate,
    label,
    merge,
    pipeline,
    plan,
    ppo,
    pull,
    push,
    reward,
    score,
    sft,
)

app = typer.Typer(
    name="lora-rlhf",
    help="The InstructGPT recipe (SFT -> reward model -> PPO-ptx) with LoRA/QLoRA adapters on ONE shared base.\n\n"
    "Typical run:  lora-rlhf sft recipes/demo_smollm2_cpu.yaml   then reward, ppo, eval (or: pipeline).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# --- commands (keep one line each; the help text is the first line of the command's docstring) ---
app.command("pipeline", help="The whole recipe: data -> SFT -> compare -> reward -> PPO(-ptx) -> eval; resumes.  e.g. lora-rlhf pipeline recipes/demo_smollm2_cpu.yaml")(pipeline.command)
app.command("sft", help="Step 1: supervised fine-tuning of a LoRA/QLoRA adapter.  e.g. lora-rlhf sft recipe.yaml")(sft.command)
app.command("compare", help="Step 2a: sample K responses per prompt (+ rank them with a labeler).  e.g. lora-rlhf compare recipe.yaml")(compare.command)
app.command("reward", help="Step 2: train the reward model (LoRA + scalar head) on rankings.  e.g. lora-rlhf reward recipe.yaml")(reward.command)
app.command("dpo", help="DPO of the policy adapter from the same comparisons, against the SFT adapter on the same base.  e.g. lora-rlhf dpo recipe.yaml")(dpo.command)
app.command("ppo", help="Step 3: PPO (+ptx) of the policy adapter against the reward, all roles on one base.  e.g. lora-rlhf ppo recipe.yaml")(ppo.command)
app.command("score", help="Score prompt/response pairs with a reward adapter.  e.g. lora-rlhf score runs/x/reward -p Hi --response Hello")(score.command)
app.command("generate", help="Answer one prompt with the base + an adapter.  e.g. lora-rlhf generate -a runs/x/sft 'Hi'")(generate.generate)
app.command("chat", help="Interactive chat with the base + an adapter.  e.g. lora-rlhf chat -a runs/x/sft")(generate.chat)
app.command("label", help="Rank candidate responses in a local web page (or --terminal) -> rankings.  e.g. lora-rlhf label cands.jsonl -o ranks.jsonl")(label.command)
app.command("push", help="Upload adapters with model cards to the Hugging Face Hub.  e.g. lora-rlhf push runs/x user/my-rlhf --what all")(push.command)
app.command("pull", help="Download an adapter repo from the Hub (safetensors only).  e.g. lora-rlhf pull user/my-rlhf adapters/")(pull.command)
app.command("merge", help="Merge an adapter into a bf16/fp16/fp32 copy of its base for serving.  e.g. lora-rlhf merge runs/x/sft merged/")(merge.command)
app.command("plan", help="Predict each stage's peak memory from the recipe alone; what to --set when it does not fit.  e.g. lora-rlhf plan recipe.yaml --gpu 24GB")(plan.command)
app.command("eval", help="Compare base, SFT, PPO(-ptx), DPO on held-out prompts: scores, KL, win rates, alignment tax.  e.g. lora-rlhf eval recipe.yaml")(eval.command)


if __name__ == "__main__":
    app()
