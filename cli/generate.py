"""`lora-rlhf generate` and `lora-rlhf chat`: see what training did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf_cli._common import SetOpt, handle_errors

AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", "-a", help="Adapter folder or Hub id (user/name[@rev]); none = bare base.")
]
RecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", exists=True, dir_okay=False, help="Take model/quantization from this recipe."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the adapter's own base).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Answer length limit in tokens.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")]


def _load(adapter: str | None, recipe: Path | None, model: str | None, set_: list[str] | None):
    from lora_rlhf.stages.inference import open_adapter

    return open_adapter(adapter, "policy", recipe=recipe, model=model, overrides=set_ or [])


@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    adapter: AdapterOpt = None,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    max_new_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    set_: SetOpt = None,
) -> None:
    """Answer one prompt with the base + an adapter, through the model's chat template."""
    from lora_rlhf.core.generation import generate_responses

    shared, role = _load(adapter, recipe, model, set_)
    [[answer]] = generate_responses(shared, [prompt], role=role, max_new_tokens=max_new_tokens,
                                    temperature=temperature)
    typer.echo(answer)


@handle_errors
def chat(
    adapter: AdapterOpt = None,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    max_new_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    set_: SetOpt = None,
) -> None:
    """Interactive chat (the conversation is kept; /reset clears it, /quit or Ctrl-D leaves)."""
    from lora_rlhf.core.generation import generate_responses

    shared, role = _load(adapter, recipe, model, set_)
    typer.echo(f"Chatting with {'adapter ' + adapter if adapter else 'the bare base'}. /reset clears, /quit leaves.")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        [[answer]] = generate_responses(shared, [history], role=role, max_new_tokens=max_new_tokens,
                                        temperature=temperature)
        history.append({"role": "assistant", "content": answer})
        typer.echo(f"bot> {answer}")
