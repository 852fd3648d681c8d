"""Ranking in a terminal (over SSH, no browser): the same session as the web page, driven by typed commands.

    2 1 3=4          rank best first ('=' ties; with K <= 9, '2134' works too) and move on
    f3 harmful       toggle a flag on response 3 (labels may be abbreviated: f3 harm)
    s                skip this prompt        q   quit (everything submitted is already saved)
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from lora_rlhf.errors import DataError
from lora_rlhf.labeling.judgement import FLAG_LABELS, parse_order
from lora_rlhf.labeling.session import LabelSession

HELP = (__doc__ or "").split("\n\n", 1)[1].rstrip()
PROMPT = "order (e.g. 2 1 3=4) | f<N> <flag> | s skip | q quit | ? help > "


def _prompt_text(prompt: str | list[dict[str, str]]) -> Text:
    if isinstance(prompt, str):
        return Text(prompt)
    text = Text()
    for turn in prompt:
        text.append(f"{turn['role']}: ", style="bold dim")
        text.append(turn["content"] + "\n")
    return text


def _flag_command(cmd: str, k: int, flags: dict[str, list[str]]) -> str:
    """'f3 harmful untruthful' toggles labels on response 3; returns what changed (raises DataError)."""
    head, *labels = cmd.split()
    number = head[1:]
    if not number.isdigit() or not 1 <= int(number) <= k or not labels:
        raise DataError(f"cannot read the flag command {cmd!r}", fix=f"e.g. 'f2 harmful' (responses 1..{k})")
    key = str(int(number) - 1)
    current = set(flags.get(key, []))
    for word in labels:
        matches = [lab for lab in FLAG_LABELS if lab.startswith(word.lower())]
        if len(matches) != 1:
            raise DataError(f"unknown flag {word!r}", fix=f"use one of: {', '.join(FLAG_LABELS)}")
        current ^= {matches[0]}
    flags[key] = [lab for lab in FLAG_LABELS if lab in current]
    if not flags[key]:
        del flags[key]
    return f"response {number} flags: {', '.join(flags.get(key, [])) or 'none'}"


def _describe(ranks: list[int]) -> str:
    """[2, 1, 3, 3] -> '2 > 1 > 3 = 4'."""
    places = sorted(set(ranks))
    return " > ".join(" = ".join(str(i + 1) for i, r in enumerate(ranks) if r == p) for p in places)


def run_terminal(session: LabelSession, labeler: str, console: Console | None = None,
                 read: Callable[[str], str] | None = None) -> dict[str, int]:
    """Label until the candidates are done or the user quits; returns counts for this run."""
    console = console or Console()
    # A Text prompt is printed as is: rich would otherwise colour its digits and brackets.
    read = read or (lambda prompt: console.input(Text(prompt, style="bold")))
    counts = {"labeled": 0, "skipped": 0}
    while True:
        nxt = session.next_item(labeler)
        done, total = nxt["progress"]["done"], nxt["progress"]["total"]
        item = nxt["item"]
        if item is None:
            console.print(Text(f"All {total} prompts are done for {labeler}.", style="green"))
            return counts
        k = len(item["responses"])
        parts = [Panel(_prompt_text(item["prompt"]), title=f"prompt {item['id']}", title_align="left",
                       subtitle=f"{done} of {total} done · labeler {labeler}", subtitle_align="right")]
        parts += [Panel(Text(r), title=f"[{i}]", title_align="left", border_style="cyan")
                  for i, r in enumerate(item["responses"], start=1)]
        console.print(Group(*parts))
        flags: dict[str, list[str]] = {}
        while True:
            try:
                cmd = read(PROMPT).strip()
            except EOFError:  # Ctrl-D quits like 'q'
                return counts
            try:
                if cmd in ("q", "quit", "exit"):
                    return counts
                if cmd in ("?", "h", "help"):
                    console.print(Text(HELP))
                elif cmd in ("s", "skip"):
                    session.submit(labeler, item["id"], flags=flags, skipped=True)
                    counts["skipped"] += 1
                    console.print(Text(f"skipped {item['id']}"))
                    break
                elif cmd[:1] in ("f", "F"):
                    console.print(Text(_flag_command(cmd, k, flags)))
                elif cmd:
                    ranks = parse_order(cmd, k)
                    if session.submit(labeler, item["id"], ranks=ranks, flags=flags):
                        counts["labeled"] += 1
                        console.print(Text(f"saved {item['id']}: {_describe(ranks)}", style="green"))
                    else:
                        console.print(Text(f"{item['id']} was already recorded for {labeler} (another session?)", style="yellow"))
                    break
            except DataError as e:
                console.print(Text(f"{e.what}" + (f"  ({e.fix})" if e.fix else ""), style="red"))
