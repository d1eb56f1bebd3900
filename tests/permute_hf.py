"""Tiny random Hugging Face models (transformers is an optional test extra) and factories for
`stardomain import --model-factory permute_hf:<name>`."""

import torch

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)


def bert(**kw):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=50, max_position_embeddings=32, **{**TINY, **kw}), add_pooling_layer=True)


def gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=4, **kw))


def vit(**kw):
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10,
                                               **{**TINY, **kw}))


def llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=50, max_position_embeddings=32, num_key_value_heads=2,
                                        **{**TINY, **kw}))


def example(name):
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return torch.randn(2, 1, 8, 8, generator=g)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    if name == "bert":
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit, "llama": llama}
