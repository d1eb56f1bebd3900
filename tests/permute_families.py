"""Model families written the way public repositories write them (our own code, in their styles):
a single-file GPT, a LLaMA-style decoder, a BERT-style post-norm encoder returning a dict, a ViT
with a class token and a fused qkv reshaped to (B, N, 3, H, d), a ConvNeXt block with layer scale
at 1e-6, a U-Net with padding, upsampling and skip concatenation, an MLP-Mixer, a channel shuffle.
Each `make_*` returns (model, example input)."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- single-file GPT (fused c_attn split with .split, size assert, targets=None, tied weights) ----
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, flash=True):
        super().__init__()
        assert n_embd % n_head == 0
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.flash = n_head, n_embd, flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                                 .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, flash=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, flash)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, flash=True):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(0.0),
            h=nn.ModuleList([Block(n_embd, n_head, block_size, flash) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_gpt(flash=True):
    return GPT(flash=flash), torch.randint(0, 11, (2, 6))


# ---- LLaMA-style decoder: RMSNorm by hand, rotary embeddings, grouped-query attention, SwiGLU ----
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep):
    b, h, t, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class LlamaAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, rope=True, eager=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope = n_heads, n_kv_heads, dim // n_heads, rope
        self.eager = eager
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k = repeat_kv(k, self.n_heads // self.n_kv_heads)
        v = repeat_kv(v, self.n_heads // self.n_kv_heads)
        if self.eager:  # written out, as Hugging Face's eager attention
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
            mask = torch.full((T, T), float("-inf")).triu(1)
            y = torch.softmax(scores + mask, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden, rope, eager=False):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, n_heads, n_kv_heads, rope, eager)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, vocab=13, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden=24, max_len=16, rope=True,
                 eager=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([LlamaBlock(dim, n_heads, n_kv_heads, hidden, rope, eager)
                                     for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        hd = dim // n_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        cos, sin = self.cos_cached[:T], self.sin_cached[:T]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))


def make_llama(n_kv_heads=2, rope=True, eager=False):
    return Llama(n_kv_heads=n_kv_heads, rope=rope, eager=eager), torch.randint(0, 13, (2, 7))


# ---- BERT-style post-norm encoder, keyword inputs, dict output ----
class BertSelfAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        scores = scores + attention_mask
        probs = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.num_attention_heads * self.attention_head_size,))


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, inter):
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, inter)
        self.output = nn.Linear(inter, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, mask):
        x = self.attn_norm(self.attn_out(self.attention(x, mask)) + x)
        return self.out_norm(self.output(F.gelu(self.intermediate(x))) + x)


class Bert(nn.Module):
    def __init__(self, vocab=17, hidden=12, layers=2, heads=3, inter=20, max_pos=16, type_vocab=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.layer = nn.ModuleList([BertLayer(hidden, heads, inter) for _ in range(layers)])
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 3)
        self.register_buffer("position_ids", torch.arange(max_pos).expand((1, -1)), persistent=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        T = input_ids.size(1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :T])
             + self.token_type_embeddings(token_type_ids))
        x = self.LayerNorm(x)
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layer:
            x = layer(x, ext)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return {"logits": self.classifier(pooled), "pooler_output": pooled}


def make_bert():
    ids = torch.randint(0, 17, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return Bert(), {"input_ids": ids, "attention_mask": mask}


# ---- ViT with a class token, fused qkv reshaped to (B, N, 3, H, d) (timm style) ----
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img=8, patch=4, dim=12, depth=2, heads=3, classes=5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


def make_vit():
    return ViT(), torch.randn(2, 3, 8, 8)


# ---- ConvNeXt block with layer scale at 1e-6, channels-first LayerNorm by hand ----
class LayerNormCF(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return inp + x


class ConvNeXt(nn.Module):
    def __init__(self, dim=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 2, 2), LayerNormCF(dim))
        self.stages = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


def make_convnext():
    return ConvNeXt(), torch.randn(2, 3, 8, 8)


# ---- U-Net: padding, upsampling, skip concatenation ----
class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.double_conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    def __init__(self, cin, cout, bilinear):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cin, cout)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    def __init__(self, n_channels=3, n_classes=2, bilinear=True):
        super().__init__()
        self.inc = DoubleConv(n_channels, 4)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(4, 8))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(8, 8 if bilinear else 16))
        self.up1 = Up(16, 4 if bilinear else 8, bilinear)
        self.up2 = Up(8, 4, bilinear)
        self.outc = nn.Conv2d(4, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x = self.up1(x3, x2)
        return self.outc(self.up2(x, x1))


def make_unet(bilinear=True):
    return UNet(bilinear=bilinear), torch.randn(2, 3, 9, 9)


# ---- MLP-Mixer ----
class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, tok_hidden, ch_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, tok_hidden), nn.GELU(), nn.Linear(tok_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, ch_hidden), nn.GELU(), nn.Linear(ch_hidden, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, dim=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(MixerBlock(16, dim, 6, 12), MixerBlock(16, dim, 6, 12))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def make_mixer():
    return Mixer(), torch.randn(2, 3, 8, 8)


# ---- channel shuffle (ShuffleNet) ----
def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleNetUnit(nn.Module):
    def __init__(self, c=8, groups=2, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.gconv = nn.Conv2d(c, c, 1, groups=groups)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, classes)
        self.groups = groups

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = channel_shuffle(self.gconv(x), self.groups)
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def make_shuffle():
    return ShuffleNetUnit(), torch.randn(2, 3, 6, 6)


# ---- a Hugging Face-like output: a dataclass, plus nested lists ----
@dataclass
class Output:
    logits: torch.Tensor
    hidden_states: tuple = ()


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return Output(self.fc2(h), ([x], [self.fc2(h) * 2]))


FAMILIES = {
    "gpt": make_gpt, "gpt_manual": lambda: make_gpt(flash=False),
    # the whole causal-mask buffer used (T = block_size = width: shapes alike everywhere)
    "gpt_manual_full": lambda: (GPT(flash=False), torch.randint(0, 11, (2, 8))), "llama": make_llama,
    "llama_mha_norope": lambda: make_llama(n_kv_heads=4, rope=False),
    "llama_mha_rope": lambda: make_llama(n_kv_heads=4, rope=True),
    # grouped-query (2 key/value heads for 4 query heads) and multi-query attention without rotary
    # embeddings: units inside the key/value heads permute too; eager: q @ k^T written out over repeat_kv
    "llama_gqa_norope": lambda: make_llama(n_kv_heads=2, rope=False),
    "llama_gqa_eager": lambda: make_llama(n_kv_heads=2, rope=False, eager=True),
    "llama_mqa_norope": lambda: make_llama(n_kv_heads=1, rope=False), "bert": make_bert, "vit": make_vit,
    "convnext": make_convnext, "unet": make_unet, "unet_transposed": lambda: make_unet(bilinear=False),
    "mixer": make_mixer, "shuffle": make_shuffle,
}
TRANSFORMERS = ("gpt", "gpt_manual", "gpt_manual_full", "llama", "llama_mha_norope", "llama_mha_rope",
                "llama_gqa_norope", "llama_gqa_eager", "llama_mqa_norope", "bert", "vit")


# ---- a model no capture can handle (a branch on values), for the CLI's --strict ----
class DataDependent(nn.Module):
    def __init__(self, features=64, classes=10):
        super().__init__()
        self.a, self.b = nn.Linear(features, 16), nn.Linear(16, classes)

    def forward(self, x):
        h = self.a(x.flatten(1))
        if h.sum() > 0:
            h = -h
        return self.b(torch.relu(h))


def data_dependent(in_shape, num_classes):
    return DataDependent(math.prod(in_shape), num_classes)


# ---- written with torch.nn.functional only (parameters passed to functions) ----
class Functional(nn.Module):
    def __init__(self, c=6, classes=4):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(c, 3, 3, 3) * 0.3), nn.Parameter(torch.zeros(c))
        self.gn_w, self.gn_b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.w2 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.3)
        self.bn_w, self.bn_b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("rm", torch.zeros(c))
        self.register_buffer("rv", torch.ones(c))
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.fc_w, self.fc_b = nn.Parameter(torch.randn(8, c) * 0.3), nn.Parameter(torch.zeros(8))
        self.out_w = nn.Parameter(torch.randn(classes, 8) * 0.3)

    def forward(self, x):
        x = F.silu(F.group_norm(F.conv2d(x, self.w1, self.b1, padding=1), 2, self.gn_w, self.gn_b))
        x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2, mode="nearest")
        x = F.pad(x, (1, 0, 0, 1))
        x = F.batch_norm(F.conv2d(x, self.w2, padding=1), self.rm, self.rv, self.bn_w, self.bn_b, False)
        h = F.layer_norm(x.mean((2, 3)), (x.shape[1],), self.ln_w, self.ln_b)
        return F.linear(F.gelu(F.linear(h, self.fc_w, self.fc_b)), self.out_w)


def make_functional():
    return Functional(), torch.randn(2, 3, 6, 6)


FAMILIES["functional"] = make_functional


def vit_digits(in_shape, num_classes, dim=12, heads=3):
    """A factory for `stardomain import --model-factory permute_families:vit_digits` (8x8 digits)."""
    m = ViT(img=in_shape[1], patch=4, dim=dim, heads=heads, classes=num_classes)
    m.patch_embed = nn.Conv2d(in_shape[0], dim, 4, 4)
    return m


def noisy(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights plus noise (layer scale at 1e-6 becomes ~0.1: a wrong permutation in that branch shows)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v
            for k, v in model.state_dict().items()}


def noisy_bn(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """`noisy`, after giving every BatchNorm2d seeded running statistics (so that a wrong permutation of them
    shows); the model is left in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v
            for k, v in model.eval().state_dict().items()}


def outputs_f64(model: nn.Module, sd: dict, x) -> torch.Tensor:
    """`model` with weights `sd`, in float64 and eval mode, on x (a tensor or keyword inputs): every
    floating-point output, flattened into one vector."""
    import copy

    from stardomain.permute.inputs import flat_tensors

    m = copy.deepcopy(model).double().eval()
    m.load_state_dict({k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()})
    with torch.no_grad():
        out = m(**x) if isinstance(x, dict) else m(x.double() if torch.is_floating_point(x) else x)
    return torch.cat([o.reshape(-1) for o in flat_tensors(out) if torch.is_floating_point(o)])
