"""TASLM model (spec 2.1-2.6): official names and LoRA count, packed == per utterance, the losses against an
independent per-utterance build of the spec's layout table, gradients, checkpoints, merge, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, needs_extension, official_keys, require_taslm_dependencies

require_taslm_dependencies()

from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM  # noqa: E402


def make(head="latent", seed=0, **kw):
    torch.manual_seed(seed)
    model = TasteSpokenLM(config=SpokenLMConfig.tiny(head=head, **kw)).eval()
    with torch.no_grad():  # non-trivial adapters, bridges and codebooks (they start at zero / identity)
        for name, p in model.named_parameters():
            if "lora_B" in name or "pad_" in name:
                p.normal_(0, 0.2)
        model.fuse_for_bridge_in_llm.weights.copy_(torch.tensor([0.3, -0.1]))
        model.vq.embed.normal_()
    return model


def batch(seed=1, lengths=((0, 0, 1, 2, 2), (0, 1, 1), (0,)), q=4, k=64):
    g = torch.Generator().manual_seed(seed)
    word_ids = [torch.tensor(w, dtype=torch.int32) for w in lengths]
    tokens = [torch.randint(0, 120000, (len(w),), generator=g) for w in lengths]
    codes = [torch.randint(0, k, (int(w[-1]) + 1, q), generator=g) for w in word_ids]
    cu = torch.tensor([0, *[len(w) for w in lengths]]).cumsum(0).to(torch.int32)
    return tokens, word_ids, codes, cu


def packed(tokens, word_ids, codes, cu):
    return torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes)


@pytest.fixture(scope="module")
def latent():
    return make("latent")


@pytest.fixture(scope="module")
def classifier():
    return make("classifier")


def test_public_names():
    import taste

    assert taste.TasteSpokenLM is TasteSpokenLM and taste.SpokenLMConfig is SpokenLMConfig
    assert taste.SpokenLMScores.__module__ == "taste.spoken_lm"
    assert taste.GenerationConfig().extra_words == 8  # the official README's defaults


def test_llama_3_2_1b_names_shapes_and_lora_count():
    with torch.device("meta"):
        model = TasteSpokenLM(config=SpokenLMConfig.llama_3_2_1b())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 45_088_768  # the paper's "45M": 16 x 64 x [2(2048+2048) + 2(2048+512) + 3(2048+8192)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or not n.startswith("language_model.") for n in trainable)
    assert (
        "fuse_for_bridge_in_llm.linear.weight" in trainable and "extract_for_bridge_out_llm.fc_mu.weight" in trainable
    )
    keys = official_keys()
    official = {k[len("spoken_lm.") :]: shape for k, shape, _ in keys if k.startswith("spoken_lm.")}
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("vq.")}
    assert ours == official


def assert_packed_equals_alone(model, tokens, word_ids, codes, cu):
    with torch.no_grad():
        h, _ = model.hidden_states(*packed(tokens, word_ids, codes, cu))
        alone = [model.hidden_states(t, torch.tensor([0, len(t)], dtype=torch.int32), w, c)[0]
                 for t, w, c in zip(tokens, word_ids, codes)]  # fmt: skip
    torch.testing.assert_close(h, torch.cat(alone), atol=1e-5, rtol=1.3e-6)


def test_packed_equals_each_utterance_alone(latent):
    tokens, word_ids, codes, cu = batch()
    assert_packed_equals_alone(latent, tokens, word_ids, codes, cu)


def spec_rows(model, t, w, c):
    """Spec 2.4's table for one utterance, built position by position: inputs (L+2, hidden), text labels at
    positions < L, TASTE labels {position: word}."""
    emb = model.decoder.embed_tokens
    audio_of = model.word_audio(c)
    pad_a, pad_t = model.pad_audio_unit_embed, model.pad_text_unit_embed
    length, words = len(t), int(w[-1]) + 1
    rows = [emb(torch.tensor(model.config.bos_id))]
    for j in range(length + 1):
        text = emb(t[j]) if j < length else pad_t
        word = int(w[j]) if j < length else words
        audio = audio_of[word - 1] if word >= 1 else pad_a
        rows.append(model.fuse(text[None], audio[None])[0])
    labels = {}
    for i in range(1, length):
        if w[i] != w[i - 1]:
            labels[i] = int(w[i]) - 1
    labels[length] = words - 1
    return torch.stack(rows), labels


@pytest.mark.parametrize("head", ["classifier", "latent"])
def test_losses_match_an_independent_build_of_the_spec_layout(head, latent, classifier):
    model = latent if head == "latent" else classifier
    tokens, word_ids, codes, cu = batch(seed=3)
    torch.manual_seed(11)
    out = model(*packed(tokens, word_ids, codes, cu))
    text_logits, text_targets, code_h, code_targets = [], [], [], []
    for t, w, c in zip(tokens, word_ids, codes):
        x, labels = spec_rows(model, t, w, c)
        h = model.causal_lm.model(inputs_embeds=x[None]).last_hidden_state[0]  # one utterance, plain causal
        text_logits.append(model.lm_head(h[: len(t)]))
        text_targets.append(t)
        for pos, word in sorted(labels.items(), key=lambda kv: kv[1]):
            code_h.append(h[pos])
            code_targets.append(c[word])
    ce = F.cross_entropy(torch.cat(text_logits).float(), torch.cat(text_targets))
    torch.testing.assert_close(out.text_loss, ce, atol=1e-5, rtol=1e-5)
    h, y_codes = torch.stack(code_h), torch.stack(code_targets)
    if head == "classifier":
        logits = model.extract_for_bridge_out_llm(h)
        ref = F.cross_entropy(logits.flatten(0, 1), y_codes.flatten())
    else:
        mu, logvar = model.extract_for_bridge_out_llm(h)
        torch.manual_seed(11)
        eps = torch.randn_like(mu)
        sigma = (0.5 * logvar).exp()
        y = model.vq.get_code_from_indices(y_codes)
        reg = F.mse_loss(mu + sigma * eps, y)
        kl = 0.5 * (sigma**2 + (mu - y) ** 2 - 1 - logvar).mean()
        ref = 0.5 * reg + 0.5 * kl
    torch.testing.assert_close(out.taste_loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, 0.5 * ce + 0.5 * ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["classifier", "latent"])
def test_scores_match_an_independent_build_of_the_spec_layout(head, latent, classifier):
    """Per token: the log-softmax of the plain causal LM over the spec table's rows; per word: the classifier's
    log-softmax summed over the layers, or the latent head's Gaussian log-density (torch.distributions) of the code
    sum, at the row of the word's TASTE label. A word with a -1 code is not scored."""
    model = latent if head == "latent" else classifier
    tokens, word_ids, codes, cu = batch(seed=5)
    codes[0][1, 2] = -1
    logvar = model.extract_for_bridge_out_llm.b_logvar if head == "latent" else torch.zeros(0)
    kept = logvar.detach().clone()
    with torch.no_grad():
        logvar.normal_()  # (a variance other than 1 in every dimension)
        s = model.score(*packed(tokens, word_ids, codes, cu))
        token_lp, word_lp, scored = [], [], []
        for t, w, c in zip(tokens, word_ids, codes):
            x, labels = spec_rows(model, t, w, c)
            h = model.causal_lm.model(inputs_embeds=x[None]).last_hidden_state[0]
            token_lp.append(model.lm_head(h[: len(t)]).float().log_softmax(-1).gather(1, t[:, None])[:, 0])
            for pos, word in sorted(labels.items(), key=lambda kv: kv[1]):
                if (c[word] < 0).any():
                    word_lp.append(torch.tensor(0.0))
                    scored.append(0)
                    continue
                scored.append(1)
                if head == "classifier":
                    logp = model.extract_for_bridge_out_llm(h[pos][None])[0].log_softmax(-1)
                    word_lp.append(logp.gather(1, c[word][:, None]).sum())
                else:
                    mu, logvar = model.extract_for_bridge_out_llm(h[pos][None])
                    y = model.vq.get_code_from_indices(c[word][None])
                    normal = torch.distributions.Normal(mu[0], (0.5 * logvar).exp())
                    word_lp.append(normal.log_prob(y[0]).sum())
        logvar.copy_(kept)
    torch.testing.assert_close(s.token_logprob, torch.cat(token_lp), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s.word_logprob, torch.stack(word_lp), atol=2e-4, rtol=1e-5)
    words = [int(w[-1]) + 1 for w in word_ids]
    per_word = torch.stack(word_lp).split(words)
    torch.testing.assert_close(
        s.text, torch.stack([x.sum() for x in torch.cat(token_lp).split([len(t) for t in tokens])])
    )
    torch.testing.assert_close(s.taste, torch.stack([x.sum() for x in per_word]), atol=2e-4, rtol=1e-5)
    assert s.num_tokens.tolist() == [len(t) for t in tokens]
    assert s.num_words.tolist() == [sum(x) for x in torch.tensor(scored).split(words)] == [2, 2, 1]


def test_scores_agree_with_the_losses_and_do_not_depend_on_the_batch(classifier):
    """The mean negative token log-probability is the text loss, the classifier's mean negative code
    log-probability per layer its TASTE loss; an utterance scores the same alone, packed, and in blocks of one row."""
    tokens, word_ids, codes, cu = batch(seed=6, lengths=((0, 1, 1, 2), (0,), (0, 0, 1, 2, 3, 3, 4)))
    args = packed(tokens, word_ids, codes, cu)
    with torch.no_grad():
        out, s = classifier(*args), classifier.score(*args)
    torch.testing.assert_close(-s.token_logprob.mean(), out.text_loss)
    torch.testing.assert_close(-s.word_logprob.sum() / codes[0].shape[1] / s.num_words.sum(), out.taste_loss)
    rows = classifier.score(*args, block_elements=1)
    torch.testing.assert_close(rows.token_logprob, s.token_logprob, atol=1e-6, rtol=0)
    for b, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
        alone = classifier.score(t, torch.tensor([0, len(t)], dtype=torch.int32), w, c)
        torch.testing.assert_close(alone.text, s.text[b : b + 1], atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(alone.taste, s.taste[b : b + 1], atol=2e-5, rtol=1e-6)
    text = classifier.score(args[0], cu, args[2])  # text only: the padding audio everywhere, as forward's
    assert text.taste.tolist() == [0, 0, 0] and text.num_words.tolist() == [0, 0, 0] and text.word_logprob.numel() == 0
    torch.testing.assert_close(-text.token_logprob.mean(), classifier(args[0], cu, args[2], None).text_loss)
    assert not torch.allclose(text.text, s.text)  # (the codes do reach the text)
    with pytest.raises(ValueError, match="block_elements must be a positive int, got 0"):
        classifier.score(*args, block_elements=0)
    with pytest.raises(ValueError, match="codes has 8 rows but the batch has 9 words"):
        classifier.score(args[0], cu, args[2], args[3][:8])


@pytest.mark.parametrize("device", DEVICES)
def test_scores_and_instruct_generation_on_each_device(device, classifier):
    """The scores of a copy on the device equal the CPU model's (float32; on a GPU, its kernels and cuBLAS), and the
    instruct mode with its stop rule runs there: every generated word has its codes, the stop token is not output."""
    import copy

    from taste.generate import GenerationConfig

    gpu = copy.deepcopy(classifier).to(device)
    args = packed(*batch(seed=6, lengths=((0, 1, 1, 2), (0,), (0, 0, 1, 2, 3, 3, 4))))
    on_cpu, on_gpu = classifier.score(*args), gpu.score(*(a.to(device) for a in args))
    for name in ("text", "taste", "token_logprob", "word_logprob"):
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), atol=1e-3, rtol=1e-4)
    assert torch.equal(on_gpu.num_words.cpu(), on_cpu.num_words)
    prefix = (128000, 128006, 882, 128007, 271)  # the Llama-3 chat template's user header
    cfg = GenerationConfig(extra_words=2, text_top_p=0.0, max_new_tokens=12, stop_id=128009,
                           instruct_prefix_ids=prefix, instruct_suffix_ids=(128009,))  # fmt: skip
    out = gpu.generate(*(a.to(device) for a in args), config=cfg)
    for b in range(3):
        n = int(out.num_words[b])
        assert (out.codes[b, :n] >= 0).all() and (out.codes[b, n:] < 0).all() and not (out.tokens[b] == 128009).any()


def test_gradients_reach_only_the_trainable_parts(latent):
    tokens, word_ids, codes, cu = batch()
    latent.train()
    try:
        latent.zero_grad()
        latent(*packed(tokens, word_ids, codes, cu)).loss.backward()
    finally:
        latent.eval()
    grads = {n for n, p in latent.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_A" in n for n in grads) and "fuse_for_bridge_in_llm.linear.weight" in grads
    assert "pad_audio_unit_embed" in grads and "extract_for_bridge_out_llm.b_logvar" in grads
    assert not any("base_layer" in n or "embed_tokens" in n for n in grads)
    assert latent.vq.embed.grad is None


def test_text_kl_against_the_adapter_free_reference():
    model = make("latent", text_kl_weight=0.9)
    tokens, word_ids, codes, cu = batch()
    out = model(torch.cat(tokens), cu, torch.cat(word_ids), None)  # text only: no TASTE loss
    assert out.taste_loss == 0
    kls, ces = [], []
    with torch.no_grad():
        for t, w in zip(tokens, word_ids):
            x, _ = spec_rows(model, t, w, torch.zeros(int(w[-1]) + 1, 4, dtype=torch.long))
            x = torch.cat(
                [
                    x[:1],
                    model.fuse(
                        x[1:] * 0 + model.decoder.embed_tokens(torch.cat([t, t[:1]])),
                        model.pad_audio_unit_embed.expand(len(t) + 1, -1),
                    ),
                ]
            )  # pad audio
            x[-1] = model.fuse(model.pad_text_unit_embed[None], model.pad_audio_unit_embed[None])[0]
            logp = model.lm_head(model.causal_lm.model(inputs_embeds=x[None]).last_hidden_state[0, : len(t)])
            logp = logp.float().log_softmax(-1)
            with model.language_model.disable_adapter():
                ids = torch.cat([torch.tensor([model.config.bos_id]), t])
                ref = model.lm_head(model.causal_lm.model(input_ids=ids[None]).last_hidden_state[0, : len(t)])
            ref = ref.float().log_softmax(-1)
            kls.append((ref.exp() * (ref - logp)).sum(-1))
            ces.append(-logp.gather(1, t[:, None])[:, 0])
    kl, ce = torch.cat(kls).mean(), torch.cat(ces).mean()
    torch.testing.assert_close(out.text_loss, 0.9 * kl + 0.1 * ce, atol=1e-5, rtol=1e-5)


def test_official_latent_quirk_and_code_prediction(latent):
    h = torch.randn(5, latent.causal_lm.config.hidden_size)
    with torch.no_grad():
        latent.extract_for_bridge_out_llm.b_logvar.fill_(0.5)
        z, mu = latent.latent(h)
        torch.testing.assert_close(z, mu)
        official = TasteSpokenLM.__new__(TasteSpokenLM)
        official.__dict__.update(latent.__dict__)
        official.config = SpokenLMConfig.tiny(official_latent=True)
        z2, _ = official.latent(h)
        torch.testing.assert_close(z2, mu + torch.exp(torch.tensor(0.25)))
        codes = latent.predict_codes(h)
        assert torch.equal(codes, latent.vq.get_indices_from_code(mu))
        latent.extract_for_bridge_out_llm.b_logvar.zero_()


def test_save_load_full_and_adapter_only(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make("classifier")
    model.save_pretrained(str(tmp_path / "full"))
    again = TasteSpokenLM.from_pretrained(str(tmp_path / "full"))
    tokens, word_ids, codes, cu = batch()
    args = packed(tokens, word_ids, codes, cu)
    with torch.no_grad():
        torch.testing.assert_close(again.hidden_states(*args)[0], model.hidden_states(*args)[0])
    # built on the meta device: the tied lm_head (saved once, as the embedding) is tied again
    assert again.causal_lm.lm_head.weight is again.causal_lm.model.embed_tokens.weight
    from safetensors.torch import load_file, save_file

    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    dropped = next(k for k in full if "layers.1.mlp.down_proj.base_layer" in k)
    save_file({k: v for k, v in full.items() if k != dropped}, str(tmp_path / "full" / "model.safetensors"))
    with pytest.raises(ValueError, match="weights missing from the checkpoint: .*layers.1.mlp.down_proj"):
        TasteSpokenLM.from_pretrained(str(tmp_path / "full"))
    # a backbone from a directory: only adapters, bridges, heads and the RVQ are written
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SpokenLMConfig.tiny().backbone)).save_pretrained(str(tmp_path / "llama"))
    model = make("latent", backbone_path=str(tmp_path / "llama"))
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert not any("base_layer" in k or "embed_tokens" in k for k in saved)
    assert any("lora_A" in k for k in saved) and "vq.embed" in saved
    again = TasteSpokenLM.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again.hidden_states(*args)[0], model.hidden_states(*args)[0])


def test_merge_lora_keeps_the_function(latent):
    model = make("latent", seed=4)
    tokens, word_ids, codes, cu = batch()
    args = packed(tokens, word_ids, codes, cu)
    with torch.no_grad():
        before = model.hidden_states(*args)[0]
        model.merge_lora()
        after = model.hidden_states(*args)[0]
    assert model.config.lora_r == 0 and not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@needs_extension
def test_compile_fullgraph(classifier):
    tokens, word_ids, codes, cu = batch()
    args = packed(tokens, word_ids, codes, cu)
    ref = classifier(*args)
    out = torch.compile(classifier, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(out.loss, ref.loss)
    scores = torch.compile(classifier.score, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(scores.taste, classifier.score(*args).taste)


def test_bad_input(classifier):
    tokens, word_ids, codes, cu = batch()
    t, c, w, k = packed(tokens, word_ids, codes, cu)
    with pytest.raises(ValueError, match="tokens must be"):
        classifier(t.int(), c, w, k)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        classifier(t, c.long(), w, k)
    with pytest.raises(ValueError, match="codes has 5 rows but the batch has 6 words"):
        classifier(t, c, w, k[:5])
    with pytest.raises(ValueError, match="at least one token"):
        classifier(t, torch.tensor([0, 5, 5, 9], dtype=torch.int32), w, k)
    vocab = classifier.causal_lm.config.vocab_size  # before: the embedding's "index out of range in self"
    with pytest.raises(ValueError, match=rf"tokens must lie in \[0, vocab_size={vocab}\), got ids in \[\d+, {vocab}\]"):
        classifier(torch.where(t == t[2], vocab, t), c, w, k)
    with pytest.raises(ValueError, match="codes must be"):
        classifier(t, c, w, k[:, :2])
    with pytest.raises(ValueError, match="head must be one of"):
        SpokenLMConfig.tiny(head="mlp")
    with pytest.raises(ValueError, match="needs LoRA"):
        SpokenLMConfig.tiny(lora_r=0, text_kl_weight=0.5)
    with pytest.raises(FileNotFoundError, match="backbone_path"):
        TasteSpokenLM(config=SpokenLMConfig.tiny(backbone_path="/nonexistent/llama"))


def test_load_official_state_dict():
    """The official checkpoint's layout: everything under ``spoken_lm.`` (an untied ``lm_head.weight`` included, as
    the released files probably hold it) and the RVQ under ``audio_tower.vq.rvq.layers.{i}._codebook``."""
    source = make("latent", seed=7)
    state = {"spoken_lm." + k: v.clone() for k, v in source.state_dict().items() if not k.startswith("vq.")}
    for q in range(source.config.num_quantizers):
        for name in ("embed", "embed_avg", "cluster_size"):
            state[f"audio_tower.vq.rvq.layers.{q}._codebook.{name}"] = getattr(source.vq, name)[q][None].clone()
        state[f"audio_tower.vq.rvq.layers.{q}._codebook.initted"] = torch.ones(1)
    for name in ("project_in", "project_out"):
        for part in ("weight", "bias"):
            state[f"audio_tower.vq.rvq.{name}.{part}"] = getattr(getattr(source.vq, name), part).clone()
    head = "spoken_lm.language_model.base_model.model.lm_head.weight"
    state[head] = torch.zeros_like(state[head])  # an untied copy in the file: the tied embedding wins
    state["speech_decoder.other.weight"] = torch.zeros(1)  # other components are ignored
    target = make("latent", seed=8)
    target.load_official_state_dict(state)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_another_transformers_family_from_a_directory(tmp_path):
    """A Qwen2 backbone (not Llama) from a local directory: LoRA on its own linear layers, packed batches and
    cached generation work the same way."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from taste.generate import GenerationConfig

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(tmp_path / "qwen"))
    model = TasteSpokenLM(config=SpokenLMConfig.tiny(backbone_path=str(tmp_path / "qwen"))).eval()
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tokens, word_ids, codes, cu = batch()
    assert_packed_equals_alone(model, tokens, word_ids, codes, cu)
    cfg = GenerationConfig(extra_words=2, text_top_p=0.0, max_new_tokens=10)
    a = model.generate(*packed(tokens, word_ids, codes, cu), config=cfg)
    b = model.generate(*packed(tokens, word_ids, codes, cu), config=cfg, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)


def test_the_llm_tokenizer_must_be_the_backbones(tmp_path):
    """Llama-3 ids over a backbone directory that ships another tokenizer (a Qwen checkpoint, whose embedding is
    larger) gave no error, only wrong tokens; over a smaller embedding, an index error at the first batch."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from taste.spoken_lm import _llama

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    bpe.train_from_iterator(["Hello world, this is a probe of a tokenizer."] * 4, trainer)
    backbone = tmp_path / "qwen"
    torch.manual_seed(0)
    qwen = Qwen2Config(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    Qwen2ForCausalLM(qwen).save_pretrained(str(backbone))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(str(backbone))
    with pytest.raises(ValueError, match=r"llm_tokenizer 'llama3' does not tokenise like the backbone's own tokenizer "
                                         r"in '.*qwen' \(the words \['Hello', 'world,'\] give"):  # fmt: skip
        TasteSpokenLM(config=SpokenLMConfig.tiny(backbone_path=str(backbone)))
    own = SpokenLMConfig.tiny(backbone_path=str(backbone), llm_tokenizer=str(backbone), bos_id=0, eos_id=1)
    assert TasteSpokenLM(config=own).config.llm_tokenizer == str(backbone)
    with pytest.warns(UserWarning, match=r"eos_id=128001 is not the eos token of llm_tokenizer '.*qwen' \(1\)"):
        TasteSpokenLM(config=SpokenLMConfig.tiny(backbone_path=str(backbone), llm_tokenizer=str(backbone), bos_id=0))
    small = _llama(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, rope_scaling=None)  # fmt: skip
    with pytest.raises(ValueError, match="llm_tokenizer 'llama3' tokenises words into ids up to 127999, but the "
                                         "backbone embeds 1000"):  # fmt: skip
        TasteSpokenLM(config=SpokenLMConfig.tiny(backbone=small))
    with pytest.raises(ValueError, match="eos_id=128300 is outside the backbone's 128256 token ids"):
        TasteSpokenLM(config=SpokenLMConfig.tiny(eos_id=128300))
    # a tokenizer directory moved since the model was saved: the model still loads, unchecked, with a warning
    with pytest.warns(UserWarning, match=r"llm_tokenizer '.*moved' could not be loaded .* not checked"):
        TasteSpokenLM(config=SpokenLMConfig.tiny(llm_tokenizer=str(tmp_path / "moved")))
