"""Data parallelism on the CPU: 2 ranks over gloo, launched by torchrun as a user would (TRL's pattern:
`torch.distributed.run --standalone`, ACCELERATE_USE_CPU=1, OMP_NUM_THREADS=1, a subprocess timeout). With
LORA_RLHF_TEST_DEVICE=cuda the same launches run over NCCL, one GPU per rank (skipped with fewer GPUs than ranks).

Every run asserts it really had 2 ranks (run.json / the saved world size), so a silent fallback to one process
fails. Tiny Llama, 4-bit, a reward function: each launch takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    DEMOS,
    REWARD_MODULE,
    TEST_DEVICE,
    TEST_MODEL,
    banana_rankings,
    demos,
    quick_overrides,
    save_sft_adapter,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # a hang (a rank waiting in a collective forever) fails instead of blocking the suite
PROMPTS = ["Say something.", "Tell me a story about a cat.", "Hi!", "2+2?", "Name a colour.", "Why?"]


def launch_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if TEST_DEVICE == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    env.pop("PPO_TEST_INTERRUPT_AT", None)  # only a test that asks for an interruption gets one
    return {**env, **extra}


def torchrun(*args: str, nproc: int = 2, timeout: int = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    if TEST_DEVICE == "cuda" and nproc > torch.cuda.device_count():
        pytest.skip(f"{nproc} NCCL ranks need {nproc} GPUs, {torch.cuda.device_count()} visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_rlhf_cli.main", *args], cwd=REPO, env=launch_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The one-process reference of a 2-rank run, run in this process (a launch costs ~10 s of imports), on one
    thread as each rank (OMP_NUM_THREADS=1): with two, the sums' order moved an SFT weight by 5e-6, past the
    tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def ppo_recipe(tiny_recipe, tmp_path):
    """Write a PPO recipe (tiny model, reward function, 6 prompts) to YAML; returns (path, recipe dict)."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def make(name: str = "run", **ppo) -> tuple[Path, dict]:
        recipe = tiny_recipe(output_dir=str(tmp_path / name), data={"prompts": {"path": str(prompts)}},
                             ppo={"total_episodes": 12, "batch_size": 4, "local_rollout_forward_batch_size": 4,
                                  "response_length": 6, "num_ppo_epochs": 1, "num_mini_batches": 2,
                                  "learning_rate": 1e-3, "temperature": 1.0, "save_steps": 10, "sample_every": 1,
                                  "reward_fn": f"{tmp_path / 'my_rewards.py'}:count_e", **ppo})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path, recipe

    return make


@pytest.mark.distributed
def test_ppo_optimisation_on_two_ranks_gives_the_adapters_of_one_process(ppo_recipe, tmp_path):
    # 8 episodes, 2 mini-batches x 2 micro-batches of 2: each rank takes 1 episode of every micro-batch. With
    # GAE (value adapter + head) and PPO-ptx (whose batch is split too), 2 epochs: 8 optimizer steps.
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": f"The {w} sat on the mat and looked at the door."}) + "\n"
                           for w in ("cat", "dog", "bird", "fox", "cow", "owl")))
    _, recipe = ppo_recipe(batch_size=8, local_rollout_forward_batch_size=8, num_mini_batches=2,
                           gradient_accumulation_steps=2, num_ppo_epochs=2, ptx_coef=0.5, ptx_batch_size=4)
    recipe["data"]["ptx"] = {"path": str(ptx)}
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    import dist_worker

    with one_thread():
        dist_worker.ppo_optimise(str(recipe_file), str(tmp_path / "one.pt"))
    two = torchrun(str(REPO / "tests" / "dist_worker.py"), "ppo-optimise", str(recipe_file), str(tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-3000:]

    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["tensors"].keys() == two["tensors"].keys()
    moved = [k for k in one["initial"] if not torch.equal(one["initial"][k], one["tensors"][k])]
    assert len(moved) == len(one["initial"])  # every trainable tensor (policy, value, head) was updated
    for key, expected in one["tensors"].items():
        torch.testing.assert_close(two["tensors"][key], expected, rtol=1e-4, atol=2e-6, msg=key)


@pytest.mark.distributed
def test_gather_rows_takes_a_different_number_of_rows_from_each_rank(tmp_path):
    """TRL's reward statistics all_gather each rank's scores; whole-prompt batches differ in size between ranks
    (a plain all_gather then aborts under gloo: the two-process pipeline did), so the reward stage gathers rows.
    Then the process group is torn down: left to the interpreter's exit, gloo aborted a rank now and then (SIGABRT,
    "terminate called without an active exception") after all the work was done."""
    run = torchrun(str(REPO / "tests" / "dist_worker.py"), "gather-rows", str(tmp_path / "rows.pt"))
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "rows.pt", weights_only=True)
    assert got["rows"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert got["scalars"].tolist() == [10.0, 11.0]
    assert got["torn_down"]


@pytest.mark.distributed
def test_a_hung_rank_is_named_after_the_recipes_timeout_not_gloos_30_minutes(tmp_path):
    """Issue 28: a stopped rank kept the other waiting for gloo's default 30 minutes, with no word of whom for."""
    import time

    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"distributed": {"timeout_minutes": 0.05}}))  # 3 s
    started = time.monotonic()
    run = torchrun(str(REPO / "tests" / "dist_worker.py"), "hung-rank", str(recipe_file), timeout=120)
    assert run.returncode != 0
    assert "process group timeout 3 s" in run.stderr, run.stderr[-3000:]
    assert "rank 0 waited 0.05 min at the test's barrier (collective #1 of this run) for rank 1, which never " \
           "reached it" in run.stderr, run.stderr[-3000:]
    assert time.monotonic() - started < 90


@pytest.mark.distributed
def test_two_process_ppo_writes_each_output_once_and_resumes_exactly(ppo_recipe, tmp_path):
    straight, recipe = ppo_recipe("straight")
    run = torchrun("-m", "lora_rlhf_cli.main", "ppo", str(straight))
    assert run.returncode == 0, run.stderr[-3000:]
    out = Path(recipe["output_dir"]) / "ppo"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert "world size 2" in (out / "train.log").read_text()
    expected = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in expected] == [1, 2, 3]            # once per step, not once per rank
    assert run.stdout.count("PPO policy written to") == 1
    samples = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == [step for step in (1, 2, 3) for _ in range(4)]  # 4 rows per step, written by rank 0 only

    # Ctrl-C during step 2 on both ranks: they finish the step, save one checkpoint, stop; --resume continues.
    interrupted, recipe2 = ppo_recipe("interrupted")
    stopped = torchrun("-m", "lora_rlhf_cli.main", "ppo", str(interrupted), PPO_TEST_INTERRUPT_AT="2")
    assert stopped.returncode != 0
    out2 = Path(recipe2["output_dir"]) / "ppo"
    assert json.loads((out2 / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    resumed_run = torchrun("-m", "lora_rlhf_cli.main", "ppo", str(interrupted), "--resume")
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    resumed = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "kl_coef", "lr"):
        assert resumed[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-6), key
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "policy" / "adapter_model.safetensors")) for o in (out, out2))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)

    # The checkpoint holds 2 ranks' sampling streams: one process (this one) refuses to continue it.
    from lora_rlhf.errors import RecipeError
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.ppo.trainer import train_ppo

    with pytest.raises(RecipeError, match=r"written by 2 process\(es\), this run has 1"):
        train_ppo(load_recipe(interrupted), resume=True, progress=False)


@pytest.mark.distributed
def test_two_nodes_on_one_machine_run_a_ppo_step_together(ppo_recipe):
    path, recipe = ppo_recipe("nodes", total_episodes=4)
    with socket.socket() as s:  # a free port for the c10d rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=lora-rlhf-test",
         "-m", "lora_rlhf_cli.main", "ppo", str(path)],
        cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        results = [(n.wait(timeout=TIMEOUT), n.stderr.read()) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for code, err in results:
        assert code == 0, err[-3000:]
    out = Path(recipe["output_dir"]) / "ppo"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["batch does not split", "fsdp"])
def test_bad_distributed_input_stops_every_rank_with_one_message(ppo_recipe, case):
    if case == "batch does not split":
        path, recipe = ppo_recipe(batch_size=3, num_mini_batches=1, local_rollout_forward_batch_size=3)
        run, message = torchrun("-m", "lora_rlhf_cli.main", "ppo", str(path)), "do not split over 2 ranks"
    else:
        path, recipe = ppo_recipe()
        run, message = torchrun("-m", "lora_rlhf_cli.main", "ppo", str(path), ACCELERATE_USE_FSDP="true"), "does not run under FSDP"
    assert run.returncode != 0
    # Every rank raises it before any collective; torchrun stops the other ranks as soon as the first one exits,
    # sometimes before they print, so at least one copy and at most one per rank.
    assert 1 <= run.stderr.count(message) <= 2, run.stderr[-3000:]
    # torchrun then reports the failed ranks with its own traceback; none comes from our code
    assert f"{REPO / 'lora_rlhf'}" not in run.stderr and f"{REPO / 'cli'}" not in run.stderr
    assert not (Path(recipe["output_dir"]) / "ppo").exists()  # nothing half-written


def _run_twice(tiny_recipe, tmp_path, stage: str, data: dict, one: dict, two: dict) -> tuple[Path, Path]:
    """`stage` as one process with `one` trainer settings (this one) and as 2 ranks with `two`; returns both output
    folders."""
    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.reward import run_reward
    from lora_rlhf.stages.sft import run_sft

    outs = []
    for name, settings, nproc in (("one", one, 1), ("two", two, 2)):
        recipe = tiny_recipe(output_dir=str(tmp_path / name), data=data, **{stage: settings})
        if nproc == 1:
            with one_thread():
                {"sft": run_sft, "reward": run_reward}[stage](recipe_from_dict(recipe))
        else:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            run = torchrun("-m", "lora_rlhf_cli.main", stage, str(path), nproc=nproc)
            assert run.returncode == 0, run.stderr[-3000:]
        out = tmp_path / name / stage
        assert json.loads((out / "metrics.json").read_text())["world_size"] == nproc
        assert f"world size {nproc}" in (out / "train.log").read_text()
        outs.append(out)
    return outs[0], outs[1]


def _assert_same_trained_tensors(one: Path, two: Path, *files: str) -> None:
    from safetensors.torch import load_file

    for file in files:
        a, b = load_file(str(one / file)), load_file(str(two / file))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{file}: {key}")
    lora_b = [v for k, v in load_file(str(one / files[0])).items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the step moved the adapter off PEFT's zero init


@pytest.mark.distributed
def test_one_sft_step_on_two_ranks_equals_one_process_accumulating_both_batches(tiny_recipe, tmp_path):
    data = {"sft": {"path": str(write_jsonl(tmp_path / "demos.jsonl", DEMOS)), "eval_fraction": 0}}
    common = {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_strategy": "no",
              "logging_steps": 1}
    one, two = _run_twice(tiny_recipe, tmp_path, "sft", data, {**common, "gradient_accumulation_steps": 2}, common)
    _assert_same_trained_tensors(one, two, "adapter_model.safetensors")


@pytest.mark.distributed
def test_one_reward_step_on_two_ranks_equals_one_process_and_keeps_prompt_groups(tiny_recipe, tmp_path):
    data = {"reward": {"path": str(write_jsonl(tmp_path / "rank.jsonl", banana_rankings(8))), "eval_fraction": 0.25},
            "sft": {"path": str(write_jsonl(tmp_path / "demos.jsonl", demos()))}}
    # 4 pairs per prompt and 4 pairs per batch: each rank's batch is one whole prompt.
    common = {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "no",
              "eval_strategy": "no", "logging_steps": 1}
    one, two = _run_twice(tiny_recipe, tmp_path, "reward", data, {**common, "gradient_accumulation_steps": 2}, common)
    _assert_same_trained_tensors(one, two, "adapter_model.safetensors", "head.safetensors")
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 8 and "reward_offset" in metrics  # rank 0 checked and normalised once


@pytest.mark.distributed
def test_two_process_pipeline_quick_variant_completes_and_writes_once(tiny_model_dir, tmp_path):
    """The demo recipe's every stage on 2 ranks, on the tiny model: what is proven here is the ranks' part (each
    stage on 2 ranks, each output written once, prompts sharded and gathered back in order), not the 135M model
    (tests/test_pipeline.py runs the demo recipe on it)."""
    out = tmp_path / "demo"
    overrides = [*quick_overrides(out), *(f"model.{key}={value}" for key, value in TEST_MODEL.items()),
                 f"model.name={tiny_model_dir}"]
    args = [a for o in overrides for a in ("--set", o)]
    run = torchrun("-m", "lora_rlhf_cli.main", "pipeline", "recipes/demo_smollm2_cpu.yaml", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pipeline done") == 1
    assert json.loads((out / "sft" / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((out / "reward" / "metrics.json").read_text())["world_size"] == 2
    for stage in ("ppo", "ppo-ptx"):
        assert json.loads((out / stage / "run.json").read_text())["world_size"] == 2
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["settings"]["world_size"] == 2
    # compare and eval: prompts sharded over the ranks, gathered back in the prompts' own order
    prompts = [json.loads(line)["prompt"] for line in (out / "data" / "prompts_train.jsonl").read_text().splitlines()]
    candidates = [json.loads(line) for line in (out / "compare" / "candidates.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in candidates] == prompts and all(len(c["responses"]) == 3 for c in candidates)
    eval_prompts = [json.loads(line)["prompt"] for line in (out / "data" / "prompts_eval.jsonl").read_text().splitlines()]
    responses = [json.loads(line) for line in (out / "eval" / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in responses] == eval_prompts


@pytest.mark.distributed
def test_accelerate_launch_runs_ppo_on_two_processes(ppo_recipe):
    path, recipe = ppo_recipe("accelerate", total_episodes=4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "-m", "lora_rlhf_cli.main", "ppo", str(path)]
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = Path(recipe["output_dir"]) / "ppo"
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("name", ["ddp_1node", "ddp_2nodes", "fsdp_qlora", "deepspeed_zero3"])
def test_shipped_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(REPO / "recipes" / "accelerate" / f"{name}.yaml")
    assert config.num_processes == 8 * config.num_machines
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[name.split("_")[0]]


def test_gathered_shares_give_each_episode_the_forward_it_had_alone(tiny_recipe, tmp_path):
    """Ranks pad their shares to their own widths; the global batch re-pads them. Every episode must keep its
    tokens, masks, lengths and per-token numbers, and a forward over the global batch its log-probs."""
    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.ppo import rollout
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.trainer import build_trainer

    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    recipe = recipe_from_dict(tiny_recipe(ppo={"batch_size": 4, "response_length": 8, "temperature": 1.0,
                                               "reward_fn": f"{tmp_path / 'my_rewards.py'}:count_e"}))
    trainer = build_trainer(recipe, resolve_sources(recipe), PROMPTS)
    sb, cfg = trainer.sb, trainer.cfg
    torch.manual_seed(0)
    shares = [rollout.score(sb, rollout.generate(sb, prompts, cfg), trainer.reward, cfg)
              for prompts in (PROMPTS[:1], PROMPTS[1:4])]  # a short and a long prompt: different paddings
    whole = rollout.concat(shares, sb.tokenizer.pad_token_id)
    assert whole.prompts == PROMPTS[:4] and whole.texts == shares[0].texts + shares[1].texts
    with sb.use("policy"):
        again = rollout.response_logprobs(sb, whole, cfg.temperature)[0]
    row = 0
    for share in shares:
        n, width = len(share.prompts), share.responses.shape[1]
        rows = slice(row, row + n)
        assert torch.equal(whole.lengths[rows], share.lengths)
        assert torch.equal(whole.responses[rows, :width], share.responses)
        assert torch.equal(whole.response_mask[rows, :width], share.response_mask)
        assert whole.response_mask[rows, width:].sum() == 0
        for name in ("logprobs", "ref_logprobs", "values"):
            assert torch.equal(getattr(whole, name)[rows, :width], getattr(share, name))
        torch.testing.assert_close(again[rows, :width], share.logprobs, rtol=1e-4, atol=1e-4)
        row += n


@pytest.mark.distributed
def test_one_dpo_step_on_two_ranks_equals_one_process_accumulating_both_batches(tiny_recipe, tmp_path):
    """TRL's DPOTrainer under DDP, the reference adapter and the (default) precomputed reference log-probs included:
    2 ranks of 2 pairs give the adapter of one process accumulating two batches of 2 (run in this process, so that
    the test launches torchrun once)."""
    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.dpo import run_dpo

    data = {"reward": {"path": str(write_jsonl(tmp_path / "rank.jsonl", banana_rankings(1)))}}  # 4 pairs
    common = {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_strategy": "no",
              "logging_steps": 1}
    sft = tmp_path / "sft"
    outs = []
    for name, settings in (("one", {**common, "gradient_accumulation_steps": 2}), ("two", common)):
        raw = tiny_recipe(output_dir=str(tmp_path / name), data=data, dpo={**settings, "sft_adapter": str(sft)})
        if not sft.is_dir():
            save_sft_adapter(recipe_from_dict(raw), sft)
        if name == "one":
            with one_thread():
                out = run_dpo(recipe_from_dict(raw))
        else:
            path = tmp_path / "two.yaml"
            path.write_text(yaml.safe_dump(raw))
            run = torchrun("-m", "lora_rlhf_cli.main", "dpo", str(path))
            assert run.returncode == 0, run.stderr[-3000:]
            out = tmp_path / name / "dpo"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["world_size"] == (1 if name == "one" else 2) and metrics["precompute_ref_log_probs"]
        assert metrics["train_pairs"] == 4 and metrics["reference"] == str(sft)
        outs.append(out)
    _assert_same_trained_tensors(outs[0], outs[1], "adapter_model.safetensors")
    from safetensors.torch import load_file

    start = load_file(str(sft / "adapter_model.safetensors"))
    trained = load_file(str(outs[1] / "adapter_model.safetensors"))
    assert all(not torch.equal(trained[k], start[k]) for k in start if "lora_B" in k)  # the step moved the policy
