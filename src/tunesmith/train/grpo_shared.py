"""GRPO that runs each prompt once per group: TRL's GRPOTrainer with its generation and its log-probability
pass replaced.

A GRPO step samples ``num_generations`` completions of every prompt and scores each completion's tokens under
the policy (and the old policy or the reference when asked). TRL prefills a prompt once per completion when it
generates, and runs it again once per completion, with gradient, in the loss; the prompt (system message and
input) is usually most of the tokens and the completion a few. Here:

- on a CPU, completions come from tunesmith's continuous-batching engine (:mod:`tunesmith.generation.engine`),
  which prefills a prompt shared by several rows once and copies its KV cache to each, and drops a row from the
  batch as soon as it ends (measured faster there: benchmarks/grpo_throughput.py). On a GPU sampling stays
  TRL's batched ``generate`` until the engine, which draws each sampled row's token on its own, is measured
  against it there;
- the log-probabilities run the prompt's tokens (all but the last) once per distinct prompt, copy that KV cache
  to the group's rows and run only the last prompt token and the completion on it; the gradient of every
  completion flows back into the one prompt pass. Same tokens, positions and mask as TRL's single pass: the same
  log-probabilities and gradients up to float rounding (tests/test_grpo_shared.py compares them).

The engine samples with the model in eval mode (no adapter dropout while sampling, as a vLLM server samples).
In a job on `tunesmith serve --engine vllm` (``rollout_server``, set by :func:`tunesmith.train.grpo.train_grpo`),
the completions are sampled on the server's vLLM instead: the policy's LoRA adapter is saved and loaded there
once per optimizer step (the weights change only then), the previous step's unloaded.
Whatever TRL's other paths handle (vLLM, transformers' continuous batching, images, several processes, gradient
checkpointing, MoE auxiliary losses) goes to TRL's own code unchanged. ``train.path: reference`` trains with
TRL's GRPOTrainer as shipped.
"""

from __future__ import annotations

from trl import GRPOTrainer

from tunesmith.generation.batch import Prompt, complete
from tunesmith.generation.sampling import GenParams


class SharedPromptGRPO(GRPOTrainer):
    """TRL's GRPOTrainer, each prompt prefilled and scored once per group."""

    rollout_server = None  # a CompletionsServer to sample on (tunesmith.generation.remote), or None: the engine
    _served: tuple[int, str] | None = None  # (optimizer step, adapter name) of the policy loaded on the server

    def _shares(self) -> bool:
        """One process, no gradient checkpointing (which turns the KV cache off): the shared passes apply."""
        args = self.args
        checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
        return self.accelerator.num_processes == 1 and not checkpointing

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields \
                or not self._shares() or self.accelerator.device.type != "cpu":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        params = GenParams(max_tokens=self.max_completion_length, temperature=self.temperature,
                           top_p=self.top_p if self.top_p is not None else 1.0)
        model = self.accelerator.unwrap_model(self.model)
        if self.rollout_server is not None:
            model = self._policy_on_server(model)
        return sample_completions(model, self._tokenizer, prompt_ids, params), None

    def _policy_on_server(self, model):
        """The policy as it is now, loaded on the rollout server (once per optimizer step)."""
        from pathlib import Path

        from tunesmith.generation.remote import RemoteModel

        step = self.state.global_step
        if self._served is None or self._served[0] != step:
            folder = Path(self.args.output_dir) / "rollout-adapter"
            model.save_pretrained(str(folder), selected_adapters=[model.active_adapter])
            name = self.rollout_server.load_adapter(folder)
            self.release_rollouts()
            self._served = (step, name)
        return RemoteModel(self.rollout_server, self._served[1], lambda: model)

    def release_rollouts(self) -> None:
        """Unload the policy's last adapter from the rollout server."""
        if self._served is not None and self.rollout_server is not None:
            self.rollout_server.unload_adapter(self._served[1])
        self._served = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **vision):
        no_prefix = input_ids.size(1) - logits_to_keep < 2  # a one-token prompt has nothing to share
        if compute_aux_loss or no_prefix or any(v is not None for v in vision.values()) or not self._shares():
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **vision)
        import torch

        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            chunk = slice(start, start + batch_size)
            with self.accelerator.autocast():
                lp, ent = shared_prompt_logps(model, input_ids[chunk], attention_mask[chunk], logits_to_keep)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy and entropies[0] is not None else None), None


def sample_completions(model, tokenizer, prompt_ids: list[list[int]], params: GenParams) -> list[list[int]]:
    """One sampled completion per prompt row on the engine (rows repeating a prompt share its prefill), each
    ending with the end-of-sequence token that stopped it, as TRL's own generation returns them."""
    training = model.training
    model.eval()
    try:
        done = complete(model, tokenizer, [Prompt(list(ids), params) for ids in prompt_ids],
                        batch_size=len(prompt_ids), max_batch_tokens=2**62)  # TRL's batch is the batch
    finally:
        model.train(training)
    return [g.ids[0] for g in done]


def shared_prompt_logps(model, input_ids, attention_mask, completion_length: int):
    """Per-token log-probabilities and entropies of the last ``completion_length`` tokens of each row (prompt
    then completion, left-padded), as TRL's fused LM head gives them: the prompt's columns but the last run
    once per distinct prompt, their KV cache copied to each row, then the rest of each row on it."""
    import torch

    cut = input_ids.size(1) - completion_length - 1  # prompt columns run once per distinct prompt
    prefix_ids, prefix_mask = input_ids[:, :cut], attention_mask[:, :cut]
    _, owner = torch.unique(prefix_ids.masked_fill(prefix_mask == 0, -1), dim=0, return_inverse=True)
    rows = owner.tolist()
    firsts = [rows.index(k) for k in range(max(rows) + 1)]  # the first row of each distinct prompt
    prefix = model(input_ids=prefix_ids[firsts], attention_mask=prefix_mask[firsts], use_cache=True,
                   logits_to_keep=1)
    cache = prefix.past_key_values
    cache.batch_select_indices(owner)
    tail = input_ids[:, cut:]  # the last prompt token, then the completion
    labels = tail.masked_fill(attention_mask[:, cut:] == 0, -100)[:, 1:]
    labels = torch.cat([labels, labels.new_full((labels.size(0), 1), -100)], 1)  # the last position predicts nothing
    out = model(input_ids=tail, attention_mask=attention_mask, past_key_values=cache, shift_labels=labels,
                fused_lm_head=True)
    entropy = out.entropy[:, :completion_length] if out.entropy is not None else None  # a reference head has none
    return out.log_probs[:, :completion_length], entropy
