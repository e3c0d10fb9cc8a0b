"""FSTTrainer and DAS rollouts (GRPOTrainer + das_rollout_func) as 2 processes on CPU (gloo), on a tiny random model.

    python examples/distributed_trainers.py

Run plainly, the script relaunches itself as `torchrun --standalone --nproc_per_node 2` (the same code a GPU user
runs with NCCL; on CPU the trainer config needs use_cpu=True) and prints rank 0's summary. Each rank then trains FST
for 2 steps and GRPO with DAS rollouts for 2 steps, and checks what each method keeps beyond the weights: FST's
fast-context pool is the same on both ranks (the reflector runs on rank 0 only, its proposal is broadcast), and with
`share_across_ranks=True` each rank's DAS history holds every rank's rollouts, in the same order.
"""

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

torch.set_num_threads(1)
SUMMARY = "summary.txt"
RULE = "Answer in one word."


def tiny_model_and_tokenizer():
    """A random 2-layer Llama over a 259-token byte-level tokenizer with a minimal chat template (built offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{ch: 3 + i for i, ch in enumerate(byte_symbols)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config), tok


def run_fst(out_dir, rank):
    from datasets import Dataset

    from hf_fastslow.trainers import FSTConfig, FSTTrainer, FunctionReflector, VerifiableTask

    class HouseRule(VerifiableTask):
        """1 iff the rollout's system turn states the rule (a random model's replies carry no signal to learn from)."""

        def score(self, prompt, completion, answer=None, **columns):
            system = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
            return (1.0, "correct") if RULE in system else (0.0, f"the system prompt must say: {RULE}")

    calls = []

    def propose(context, records):  # tags its proposal with the rank it ran on
        calls.append(context)
        return f"{context} {RULE} (proposed on rank {rank})"

    rows = [{"prompt": [{"role": "system", "content": "You are a helper."}, {"role": "user", "content": f"{i}+{i}?"}]}
            for i in range(8)]
    args = FSTConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
                     per_device_train_batch_size=2, num_generations=2, max_completion_length=4, max_steps=2,
                     learning_rate=1e-2, disable_tqdm=True, logging_strategy="no", fast_every_steps=2,
                     pareto_set_size=4, reflection_minibatch_size=2, candidates_per_round=1, max_proposals_per_round=1)
    model, tok = tiny_model_and_tokenizer()
    trainer = FSTTrainer(model=model, reward_funcs=HouseRule(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, reflector=FunctionReflector(propose))
    trainer.train()
    return {"context": trainer.fast_context, "pool": trainer.fast_pool, "scores": trainer.fast_scores,
            "reflector_calls": len(calls)}


def run_das(out_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hf_fastslow.generation import DASDrafter, SuffixHistory
    from hf_fastslow.trainers import das_rollout_func

    drafter = DASDrafter(history=SuffixHistory(max_depth=16), cost_aware=False)
    args = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
                      per_device_train_batch_size=2, num_generations=4, max_completion_length=16, max_steps=2,
                      learning_rate=1e-3, disable_tqdm=True, logging_strategy="no")
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(2)])

    def length_reward(completion_ids, **kwargs):
        return [len(ids) / 16 for ids in completion_ids]

    model, tok = tiny_model_and_tokenizer()
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=prompts,
                          processing_class=tok, rollout_func=das_rollout_func(drafter, share_across_ranks=True))
    trainer.train()
    history = drafter.history  # problems and rollouts in the order they were added (rank order after each all-gather)
    content = repr([(str(p), list(history.rollouts(p).values())) for p in history.problems] + history.known_lengths())
    return {"generated": drafter.stats.sequences, "held": len(history),
            "digest": hashlib.sha256(content.encode()).hexdigest()[:12]}


def worker(out_dir):
    from hf_fastslow.trainers.distributed import all_gather_objects

    rank = int(os.environ["RANK"])
    fst = all_gather_objects(run_fst(os.path.join(out_dir, "fst"), rank))  # every rank's result, rank order
    das = all_gather_objects(run_das(os.path.join(out_dir, "das")))
    if rank == 0:
        same_pool = all(r["pool"] == fst[0]["pool"] and r["scores"] == fst[0]["scores"] for r in fst)
        lines = [f"FST fast context on rank 0: {fst[0]['context']!r}",
                 f"FST fast context identical on both ranks: {fst[0]['context'] == fst[1]['context']} "
                 f"(pool and Pareto scores too: {same_pool})",
                 f"FST reflector calls per rank: {[r['reflector_calls'] for r in fst]}"]
        lines += [f"DAS rank {r}: generated {d['generated']} rollouts, history digest {d['digest']}"
                  for r, d in enumerate(das)]
        lines.append(f"DAS history: rank 0 holds {das[0]['held']} rollouts, rank 1 holds {das[1]['held']}, "
                     f"identical: {das[0]['digest'] == das[1]['digest']}")
        with open(os.path.join(out_dir, SUMMARY), "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), out_dir]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        # its own session, so that a timeout stops torchrun and both ranks (one process group, by its id)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"torchrun exited with {proc.returncode}:\n{log[-4000:]}")
        print(f"torchrun --standalone --nproc_per_node 2 (CPU, gloo) finished in {time.perf_counter() - start:.0f} s")
        with open(os.path.join(out_dir, SUMMARY)) as f:
            print(f.read(), end="")


if __name__ == "__main__":
    worker(sys.argv[1]) if "LOCAL_RANK" in os.environ else main()
