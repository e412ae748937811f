"""tc.analyze and ConservationMonitor over tiny Hugging Face architectures, built offline from configs.

Each model: hidden 8, 1 layer, 2 heads, intermediate 16, vocab 16, 16 positions (shrunk so that
D ≈ 700–1000 and the count runs in seconds to minutes), float64, eval mode, dropout 0; input
``input_ids`` (2, 6), or pixel values / audio features. One model per process:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python experiments/hf_sweep.py gpt2 [eager|sdpa]

prints the analysis (theta="random", max_lie_parameters=D+1, max_seconds=240 or
$SWEEP_MAX_SECONDS), the monitor's groups and warnings, and a ``RESULT {json}`` line (D, tracked
rank, count, complete, missing, shares, times). Names: see ``BUILDERS`` (the decoders after
``whisperenc`` were added by the decoder sweep, results/hf_sweep_decoders.md; the MoE ones run
their experts' eager loop, as torch._grouped_mm has no float64 kernel, and XGLM is built with
float64 as the default dtype, as its eager mask needs). The names after ``poolformer`` were added
by the fourth sweep (results/hf_sweep_fourth.md; qwen3_moe, olmoe and granitemoe run their experts'
eager loop too). The names after ``data2vec_audio`` were added by the fifth sweep
(results/hf_sweep_fifth.md; dbrx, deepseek_v3 and jamba run their experts' eager loop; dbrx needs
clip_qkv, rwkv and recurrent_gemma 2 layers, mpnet 32 buckets, efficientnet hidden_dim 128, bit
num_groups 2, or their own forward raises; experiments/hf_sweep_by_hand.py checks every tracked law
by hand). The names after ``patchtst`` were added by the seventh sweep (results/hf_sweep_seventh.md;
the MoE ones in the eager-loop list below run their experts' eager loop; longcat_flash needs
moe_topk 2, or its eager expert loop raises; zamba2 adapter_rank 4, or D = 7756; switch_transformers
keeps its float32 router, which casts its own classifier inside forward). The names after ``t5gemma``
were added by the ninth sweep (results/hf_sweep_ninth.md; Swin2SR is built with its
``pixelshuffledirect`` super-resolution head, ``CLASSES``, and ``swin2sr_pixelshuffle`` with its
``pixelshuffle`` head, whose fixed 64 features make D = 157,539; the MoE ones run their experts' eager loop;
MRA is left out: without its CUDA kernel its attention returns zeros, and its forward casts q, k, v
to float32, so it cannot run in float64). ``experiments/hf_sweep_table.py`` turns a folder of logs into a table.

    PYTHONPATH=. python experiments/hf_sweep.py --monitor [--float32] NAME ...

builds only the monitor (laws found and verified, no count) for each model in one process and
prints ``MONITOR {json}`` (laws per model), and ``REFUSED {json}`` for a model with laws proposed but
refused by the monitor's own numerical check.
"""
import json, os, sys, time, traceback, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers as tf
F64 = torch.float64
H, I, V, P = 8, 16, 16, 16
def ids(): return {"input_ids": torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))}
def ROPE(f): return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": f}
def pix(c=3, s=16): return {"pixel_values": torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(0), dtype=F64)}
BUILDERS = {
 "gpt2": lambda: (tf.GPT2Config(n_embd=H, n_layer=1, n_head=2, vocab_size=V, n_positions=P, n_inner=I), ids()),
 "gptneo": lambda: (tf.GPTNeoConfig(hidden_size=H, num_layers=1, num_heads=2, attention_types=[[["global"],1]], vocab_size=V, max_position_embeddings=P, intermediate_size=I), ids()),
 "opt": lambda: (tf.OPTConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, ffn_dim=I, vocab_size=V, max_position_embeddings=P, word_embed_proj_dim=H), ids()),
 "bloom": lambda: (tf.BloomConfig(hidden_size=H, n_layer=1, n_head=2, vocab_size=V), ids()),
 "falcon": lambda: (tf.FalconConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "llama": lambda: (tf.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "mistral": lambda: (tf.MistralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=V, max_position_embeddings=P, head_dim=4), ids()),
 "qwen2": lambda: (tf.Qwen2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "phi": lambda: (tf.PhiConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "gemma": lambda: (tf.GemmaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P), ids()),
 "gptj": lambda: (tf.GPTJConfig(n_embd=H, n_layer=1, n_head=2, rotary_dim=4, n_inner=I, vocab_size=V, n_positions=P), ids()),
 "bert": lambda: (tf.BertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "roberta": lambda: (tf.RobertaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P+2), ids()),
 "distilbert": lambda: (tf.DistilBertConfig(dim=H, hidden_dim=I, n_layers=1, n_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "albert": lambda: (tf.AlbertConfig(embedding_size=H, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "electra": lambda: (tf.ElectraConfig(embedding_size=H, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "debertav2": lambda: (tf.DebertaV2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, relative_attention=False), ids()),
 "t5enc": lambda: (tf.T5Config(d_model=H, d_kv=4, d_ff=I, num_layers=1, num_heads=2, vocab_size=V), ids()),
 "vit": lambda: (tf.ViTConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "clipvision": lambda: (tf.CLIPVisionConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, projection_dim=H), pix(1, 8)),
 "whisperenc": lambda: (tf.WhisperConfig(d_model=H, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=I, num_mel_bins=4, max_source_positions=4, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=I, vocab_size=V, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, max_target_positions=P), {"input_features": torch.randn(2, 4, 8, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 # decoders added by the decoder sweep (results/hf_sweep_decoders.md)
 "gpt_neox": lambda: (tf.GPTNeoXConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, vocab_size=V, max_position_embeddings=P, rope_parameters=ROPE(0.5)), ids()),
 "gpt_bigcode": lambda: (tf.GPTBigCodeConfig(n_embd=H, n_layer=1, n_head=2, n_inner=I, vocab_size=V, n_positions=P, multi_query=True), ids()),
 "codegen": lambda: (tf.CodeGenConfig(n_embd=H, n_layer=1, n_head=2, rotary_dim=2, n_inner=I, vocab_size=V, n_positions=P, n_ctx=P), ids()),
 "mpt": lambda: (tf.MptConfig(d_model=H, n_heads=2, n_layers=1, expansion_ratio=2, max_seq_len=P, vocab_size=V), ids()),
 "stablelm": lambda: (tf.StableLmConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, rope_parameters=ROPE(0.5)), ids()),
 "olmo": lambda: (tf.OlmoConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "olmo2": lambda: (tf.Olmo2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "cohere": lambda: (tf.CohereConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "phi3": lambda: (tf.Phi3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, original_max_position_embeddings=P, pad_token_id=0), ids()),
 "gemma2": lambda: (tf.Gemma2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, vocab_size=V, max_position_embeddings=P), ids()),
 "qwen3": lambda: (tf.Qwen3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P), ids()),
 "starcoder2": lambda: (tf.Starcoder2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=V, max_position_embeddings=P), ids()),
 "mixtral": lambda: (tf.MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, vocab_size=V, max_position_embeddings=P, head_dim=4), ids()),
 "qwen2_moe": lambda: (tf.Qwen2MoeConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8, vocab_size=V, max_position_embeddings=P), ids()),
 "granite": lambda: (tf.GraniteConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25), ids()),
 "persimmon": lambda: (tf.PersimmonConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, rope_parameters=ROPE(0.5)), ids()),
 "xglm": lambda: (tf.XGLMConfig(d_model=H, ffn_dim=I, num_layers=1, attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "biogpt": lambda: (tf.BioGptConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "mamba": lambda: (tf.MambaConfig(hidden_size=H, state_size=4, num_hidden_layers=1, vocab_size=V, expand=2, conv_kernel=2, use_mambapy=False), ids()),
 # encoders, vision and seq2seq added by the encoder sweep (results/hf_sweep_encoders.md)
 "bart": lambda: (tf.BartConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "marian": lambda: (tf.MarianConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=1), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "xlm_roberta": lambda: (tf.XLMRobertaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P+2), ids()),
 "mobilebert": lambda: (tf.MobileBertConfig(hidden_size=H, embedding_size=H, intra_bottleneck_size=H, true_hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_feedforward_networks=1, vocab_size=V, max_position_embeddings=P), ids()),
 "squeezebert": lambda: (tf.SqueezeBertConfig(hidden_size=H, embedding_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2, output_groups=2), ids()),
 "swin": lambda: (tf.SwinConfig(image_size=8, patch_size=2, num_channels=1, embed_dim=H, depths=[1], num_heads=[2], window_size=2, mlp_ratio=2.0), pix(1, 8)),
 "convnext": lambda: (tf.ConvNextConfig(num_channels=1, patch_size=2, num_stages=1, hidden_sizes=[H], depths=[1], image_size=8), pix(1, 8)),
 "dinov2": lambda: (tf.Dinov2Config(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "beit": lambda: (tf.BeitConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, vocab_size=V), pix(1, 8)),
 "deit": lambda: (tf.DeiTConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "resnet": lambda: (tf.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 6], depths=[1, 1], layer_type="basic"), pix(1, 8)),
 "resnet_tiny": lambda: (tf.ResNetConfig(num_channels=1, embedding_size=2, hidden_sizes=[2, 4], depths=[1, 1], layer_type="basic"), pix(1, 8)),
 "mobilenetv2": lambda: (tf.MobileNetV2Config(num_channels=1, image_size=16, depth_multiplier=0.1, min_depth=2, finegrained_output=False), pix(1, 16)),
 "segformer": lambda: (tf.SegformerConfig(num_channels=1, num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[H], patch_sizes=[3], strides=[2], num_attention_heads=[2], mlp_ratios=[2], decoder_hidden_size=H), pix(1, 8)),
 "wav2vec2": lambda: (tf.Wav2Vec2Config(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=V, mask_time_prob=0.0, do_stable_layer_norm=False, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "regnet": lambda: (tf.RegNetConfig(num_channels=1, embedding_size=H, hidden_sizes=[H], depths=[1], groups_width=4, layer_type="x"), pix(1, 8)),
 "regnet_tiny": lambda: (tf.RegNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4], depths=[1], groups_width=2, layer_type="x"), pix(1, 8)),
 "poolformer": lambda: (tf.PoolFormerConfig(num_channels=1, num_encoder_blocks=1, depths=[1], hidden_sizes=[H], patch_sizes=[3], strides=[2], padding=[1], mlp_ratio=2.0), pix(1, 8)),
 # added by the fourth sweep (results/hf_sweep_fourth.md)
 "gemma3_text": lambda: (tf.Gemma3TextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, vocab_size=V, max_position_embeddings=P, sliding_window=4), ids()),
 "qwen3_moe": lambda: (tf.Qwen3MoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P), ids()),
 "olmoe": lambda: (tf.OlmoeConfig(hidden_size=H, intermediate_size=8, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "glm": lambda: (tf.GlmConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "glm4": lambda: (tf.Glm4Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "nemotron": lambda: (tf.NemotronConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0, bos_token_id=1, eos_token_id=2), ids()),
 "smollm3": lambda: (tf.SmolLM3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "helium": lambda: (tf.HeliumConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "granitemoe": lambda: (tf.GraniteMoeConfig(hidden_size=H, intermediate_size=8, num_local_experts=2, num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25), ids()),
 "exaone4": lambda: (tf.Exaone4Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "falcon_mamba": lambda: (tf.FalconMambaConfig(hidden_size=H, state_size=4, num_hidden_layers=1, vocab_size=V, expand=2, conv_kernel=2, use_mambapy=False), ids()),
 "roformer": lambda: (tf.RoFormerConfig(embedding_size=H, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "megatron_bert": lambda: (tf.MegatronBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "ernie": lambda: (tf.ErnieConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "convbert": lambda: (tf.ConvBertConfig(embedding_size=H, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, head_ratio=2, conv_kernel_size=3, vocab_size=V, max_position_embeddings=P), ids()),
 "esm": lambda: (tf.EsmConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=1, position_embedding_type="rotary"), ids()),
 "funnel": lambda: (tf.FunnelConfig(d_model=H, n_head=2, d_head=4, d_inner=I, block_sizes=[1], block_repeats=[1], num_decoder_layers=1, vocab_size=V, max_position_embeddings=P), ids()),
 "big_bird": lambda: (tf.BigBirdConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, attention_type="original_full"), ids()),
 "xlnet": lambda: (tf.XLNetConfig(d_model=H, n_layer=1, n_head=2, d_inner=I, vocab_size=V), ids()),
 "t5": lambda: (tf.T5Config(d_model=H, d_kv=4, d_ff=I, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=V, decoder_start_token_id=0), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "pegasus": lambda: (tf.PegasusConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "m2m_100": lambda: (tf.M2M100Config(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "convnextv2": lambda: (tf.ConvNextV2Config(num_channels=1, patch_size=2, num_stages=1, hidden_sizes=[H], depths=[1], image_size=8), pix(1, 8)),
 "levit": lambda: (tf.LevitConfig(image_size=16, num_channels=1, kernel_size=3, stride=2, padding=1, patch_size=16, hidden_sizes=[H, H, H], num_attention_heads=[2, 2, 2], depths=[1, 0, 0], key_dim=[4, 4, 4], drop_path_rate=0, mlp_ratio=[1, 1, 1], attention_ratio=[1, 1, 1]), pix(1, 16)),  # the config always subsamples twice (3 stages)
 "cvt": lambda: (tf.CvtConfig(num_channels=1, patch_sizes=[3], patch_stride=[2], patch_padding=[1], embed_dim=[H], num_heads=[2], depth=[1], mlp_ratio=[2.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0], qkv_bias=[True], cls_token=[False], qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1], stride_kv=[2], padding_q=[1], stride_q=[1]), pix(1, 8)),
 "pvt": lambda: (tf.PvtConfig(image_size=8, num_channels=1, num_encoder_blocks=1, depths=[1], sequence_reduction_ratios=[1], hidden_sizes=[H], patch_sizes=[2], strides=[2], num_attention_heads=[2], mlp_ratios=[2]), pix(1, 8)),
 "focalnet": lambda: (tf.FocalNetConfig(image_size=8, patch_size=2, num_channels=1, embed_dim=H, depths=[1], focal_levels=[1], focal_windows=[3], mlp_ratio=2.0), pix(1, 8)),
 "vit_mae": lambda: (tf.ViTMAEConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, mask_ratio=0.0), pix(1, 8)),
 "hubert": lambda: (tf.HubertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=V, mask_time_prob=0.0, do_stable_layer_norm=False, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "sew": lambda: (tf.SEWConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, squeeze_factor=2, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 48, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "data2vec_audio": lambda: (tf.Data2VecAudioConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=3, num_conv_pos_embedding_layers=1, num_conv_pos_embedding_groups=2, vocab_size=V, mask_time_prob=0.0), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 # added by the fifth sweep (results/hf_sweep_fifth.md)
 "cohere2": lambda: (tf.Cohere2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0, layer_types=["sliding_attention"], sliding_window=4), ids()),
 "dbrx": lambda: (tf.DbrxConfig(d_model=H, n_heads=2, n_layers=1, max_seq_len=P, vocab_size=V, attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 2, "moe_top_k": 1}, pad_token_id=0), ids()),
 "ministral": lambda: (tf.MinistralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "deepseek_v3": lambda: (tf.DeepseekV3Config(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=4, q_lora_rank=None, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "jamba": lambda: (tf.JambaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=1, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=2, vocab_size=V, max_position_embeddings=P, use_mamba_kernels=False, pad_token_id=0), ids()),
 "mamba2": lambda: (tf.Mamba2Config(hidden_size=H, num_heads=2, head_dim=8, state_size=4, n_groups=1, num_hidden_layers=1, vocab_size=V, expand=2, conv_kernel=2, chunk_size=8, pad_token_id=0), ids()),
 "rwkv": lambda: (tf.RwkvConfig(hidden_size=H, attention_hidden_size=H, intermediate_size=I, num_hidden_layers=2, vocab_size=V, context_length=P), ids()),
 "recurrent_gemma": lambda: (tf.RecurrentGemmaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4, lru_width=H, conv1d_width=2, attention_window_size=P, block_types=["recurrent", "attention"], vocab_size=V, pad_token_id=0), ids()),
 "gpt_neox_japanese": lambda: (tf.GPTNeoXJapaneseConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_multiple_size=2, vocab_size=V, max_position_embeddings=P), ids()),
 "ctrl": lambda: (tf.CTRLConfig(n_embd=H, n_layer=1, n_head=2, dff=I, vocab_size=V, n_positions=P), ids()),
 "mpnet": lambda: (tf.MPNetConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P + 2, relative_attention_num_buckets=32), ids()),  # the bucket count 32 is hard-coded in its forward
 "deberta": lambda: (tf.DebertaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, relative_attention=False), ids()),
 "rembert": lambda: (tf.RemBertConfig(hidden_size=H, input_embedding_size=H, output_embedding_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P), ids()),
 "nystromformer": lambda: (tf.NystromformerConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P + 2, num_landmarks=2, segment_means_seq_len=6, conv_kernel_size=3), ids()),
 "xlm": lambda: (tf.XLMConfig(emb_dim=H, n_layers=1, n_heads=2, vocab_size=V, max_position_embeddings=P, n_langs=1), ids()),
 "ibert": lambda: (tf.IBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P + 2, quant_mode=False), ids()),
 "canine": lambda: (tf.CanineConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_hash_functions=2, num_hash_buckets=16, downsampling_rate=2, upsampling_kernel_size=2, local_transformer_stride=4, max_position_embeddings=P), {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}),
 "luke": lambda: (tf.LukeConfig(hidden_size=H, entity_emb_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, entity_vocab_size=8, max_position_embeddings=P + 2, use_entity_aware_attention=False), ids()),
 "mbart": lambda: (tf.MBartConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "blenderbot": lambda: (tf.BlenderbotConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "mt5": lambda: (tf.MT5Config(d_model=H, d_kv=4, d_ff=I, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=V, decoder_start_token_id=0), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "swinv2": lambda: (tf.Swinv2Config(image_size=8, patch_size=2, num_channels=1, embed_dim=H, depths=[1], num_heads=[2], window_size=2, mlp_ratio=2.0), pix(1, 8)),
 "efficientnet": lambda: (tf.EfficientNetConfig(  # hidden_dim = round_filters(1280) at width 0.1, as its top convolution has
   num_channels=1, image_size=16, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, kernel_sizes=[3], in_channels=[8], out_channels=[8], depthwise_padding=[], strides=[1], num_block_repeats=[1], expand_ratios=[2]), pix(1, 16)),
 "mobilevit": lambda: (tf.MobileViTConfig(num_channels=1, image_size=16, patch_size=2, hidden_sizes=[8, 8, 8], neck_hidden_sizes=[4, 4, 8, 8, 8, 8, 16], num_attention_heads=2, mlp_ratio=2.0, expand_ratio=2.0), pix(1, 32)),
 "bit": lambda: (tf.BitConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="bottleneck", global_padding="SAME", num_groups=2), pix(1, 16)),
 "yolos": lambda: (tf.YolosConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=[8, 8], patch_size=4, num_channels=1, num_detection_tokens=2), pix(1, 8)),
 "siglip_vision": lambda: (tf.SiglipVisionConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "videomae": lambda: (tf.VideoMAEConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, num_frames=2, tubelet_size=2), {"pixel_values": torch.randn(2, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)}),
 "wavlm": lambda: (tf.WavLMConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_buckets=4, max_bucket_distance=8, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "unispeech": lambda: (tf.UniSpeechConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "zamba": lambda: (tf.ZambaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, attention_hidden_size=2 * H, attention_head_dim=8, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=2, n_mamba_heads=1, layers_block_type=["mamba", "hybrid"], vocab_size=V, max_position_embeddings=P, use_mamba_kernels=False, pad_token_id=0), ids()),
 "flaubert": lambda: (tf.FlaubertConfig(emb_dim=H, n_layers=1, n_heads=2, vocab_size=V, max_position_embeddings=P, n_langs=1), ids()),
 "yoso": lambda: (tf.YosoConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P + 2, use_expectation=True, conv_window=None), ids()),
 "longformer": lambda: (tf.LongformerConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P + 2, attention_window=[4], pad_token_id=1), {"input_ids": torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(0))}),
 "led": lambda: (tf.LEDConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_encoder_position_embeddings=P, max_decoder_position_embeddings=P, attention_window=[4], pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), {"input_ids": torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0)), "decoder_input_ids": torch.randint(3, V, (2, 4), generator=torch.Generator().manual_seed(1))}),
 "timesformer": lambda: (tf.TimesformerConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, num_frames=2), {"pixel_values": torch.randn(2, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)}),
 "speech_to_text": lambda: (tf.Speech2TextConfig(d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=H, decoder_ffn_dim=H, vocab_size=V, max_source_positions=P, max_target_positions=P, num_conv_layers=1, conv_kernel_sizes=[3], conv_channels=8, input_feat_per_channel=4, input_channels=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), {"input_features": torch.randn(2, 8, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), "decoder_input_ids": torch.randint(3, V, (2, 4), generator=torch.Generator().manual_seed(1))}),
 "patchtst": lambda: (tf.PatchTSTConfig(num_input_channels=2, context_length=16, patch_length=4, patch_stride=4, d_model=H, num_attention_heads=2, num_hidden_layers=1, ffn_dim=I, prediction_length=4), {"past_values": torch.randn(2, 16, 2, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 # added by the seventh sweep (results/hf_sweep_seventh.md)
 "apertus": lambda: (tf.ApertusConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "arcee": lambda: (tf.ArceeConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "bitnet": lambda: (tf.BitNetConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "deepseek_v2": lambda: (tf.DeepseekV2Config(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=0, kv_lora_rank=4, q_lora_rank=None, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "diffllama": lambda: (tf.DiffLlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "doge": lambda: (tf.DogeConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "dots1": lambda: (tf.Dots1Config(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=0, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "ernie4_5": lambda: (tf.Ernie4_5Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "ernie4_5_moe": lambda: (tf.Ernie4_5_MoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, moe_num_experts=2, moe_k=1, moe_num_shared_experts=1, moe_layer_start_index=0, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "falcon_h1": lambda: (tf.FalconH1Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_chunk_size=8, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "flex_olmo": lambda: (tf.FlexOlmoConfig(hidden_size=H, intermediate_size=8, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "glm4_moe": lambda: (tf.Glm4MoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=0, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "gpt_oss": lambda: (tf.GptOssConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_local_experts=2, num_experts_per_tok=1, vocab_size=V, max_position_embeddings=P, sliding_window=4, layer_types=["full_attention"], pad_token_id=0), ids()),
 "hunyuan_v1_dense": lambda: (tf.HunYuanDenseV1Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "hunyuan_v1_moe": lambda: (tf.HunYuanMoEV1Config(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_experts=2, moe_topk=1, num_shared_expert=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "internlm3": lambda: (tf.InternLM3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "jetmoe": lambda: (tf.JetMoeConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_key_value_heads=2, kv_channels=4, num_local_experts=2, num_experts_per_tok=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "lfm2": lambda: (tf.Lfm2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, layer_types=["conv", "full_attention"], conv_L_cache=2, block_auto_adjust_ff_dim=False, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "lfm2_moe": lambda: (tf.Lfm2MoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, num_dense_layers=1, layer_types=["conv", "full_attention"], conv_L_cache=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "llama4_text": lambda: (tf.Llama4TextConfig(hidden_size=H, intermediate_size=8, intermediate_size_mlp=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_local_experts=2, num_experts_per_tok=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "minicpm3": lambda: (tf.MiniCPM3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=4, q_lora_rank=4, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "minimax": lambda: (tf.MiniMaxConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_local_experts=2, num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"], block_size=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "modernbert": lambda: (tf.ModernBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), ids()),
 "modernbert_decoder": lambda: (tf.ModernBertDecoderConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), ids()),
 "nanochat": lambda: (tf.NanoChatConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "olmo3": lambda: (tf.Olmo3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, sliding_window=4, pad_token_id=0), ids()),
 "seed_oss": lambda: (tf.SeedOssConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "vaultgemma": lambda: (tf.VaultGemmaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, vocab_size=V, max_position_embeddings=P, sliding_window=4, pad_token_id=0), ids()),
 "qwen3_next": lambda: (tf.Qwen3NextConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_experts=2, num_experts_per_tok=1, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=2, layer_types=["linear_attention", "full_attention"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "switch_transformers": lambda: (tf.SwitchTransformersConfig(d_model=H, d_kv=4, d_ff=I, expert_capacity=8, num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=2, num_experts=2, vocab_size=V, decoder_start_token_id=0, pad_token_id=0), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "umt5": lambda: (tf.UMT5Config(d_model=H, d_kv=4, d_ff=I, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=V, decoder_start_token_id=0, pad_token_id=0), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 "whisper": lambda: (tf.WhisperConfig(d_model=H, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=I, num_mel_bins=4, max_source_positions=4, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=I, vocab_size=V, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, max_target_positions=P), {"input_features": torch.randn(2, 4, 8, dtype=F64, generator=torch.Generator().manual_seed(0)), "decoder_input_ids": torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(1))}),
 "zamba2": lambda: (tf.Zamba2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, attention_head_dim=8, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_ngroups=1, mamba_headdim=8, n_mamba_heads=2, chunk_size=8, adapter_rank=4, layers_block_type=["mamba", "hybrid"], vocab_size=V, max_position_embeddings=P, use_mamba_kernels=False, pad_token_id=0), ids()),
 "nemotron_h": lambda: (tf.NemotronHConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=4, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4, n_groups=1, conv_kernel=2, expand=2, chunk_size=8, hybrid_override_pattern="M*-", vocab_size=V, max_position_embeddings=P, use_mamba_kernels=False, pad_token_id=0), ids()),
 "gemma3n_text": lambda: (tf.Gemma3nTextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, vocab_size_per_layer_input=V, hidden_size_per_layer_input=4, max_position_embeddings=P, sliding_window=4, layer_types=["full_attention"], laurel_rank=2, altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0], pad_token_id=0), ids()),
 "kimi_linear": lambda: (tf.KimiLinearConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=4, q_lora_rank=None, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4, num_local_experts=2, num_experts_per_tok=1, n_shared_experts=1, n_group=1, topk_group=1, linear_head_dim=4, linear_num_heads=2, linear_conv_kernel_dim=2, layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "longcat_flash": lambda: (tf.LongcatFlashConfig(hidden_size=H, num_layers=1, num_attention_heads=2, num_key_value_heads=2, ffn_hidden_size=I, expert_ffn_hidden_size=8, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, head_dim=2, v_head_dim=4, moe_topk=2, n_routed_experts=2, zero_expert_num=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "xlstm": lambda: (tf.xLSTMConfig(hidden_size=H, embedding_dim=H, num_hidden_layers=1, num_blocks=1, num_heads=2, vocab_size=V, chunk_size=2, mode="train", chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native", autocast_kernel_dtype="float32", inference_state_dtype="float32", norm_reduction_force_float32=False, ffn_round_up_to_multiple_of=8, pad_token_id=0), ids()),
 "t5gemma": lambda: (tf.T5GemmaConfig(encoder=dict(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, vocab_size=V, max_position_embeddings=P, sliding_window=4, layer_types=["full_attention"]), decoder=dict(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=4, vocab_size=V, max_position_embeddings=P, sliding_window=4, layer_types=["full_attention"]), vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2), dict(ids(), decoder_input_ids=ids()["input_ids"][:, :4])),
 # added by the ninth sweep (results/hf_sweep_ninth.md): vision / image backbones
 "swin2sr": lambda: (tf.Swin2SRConfig(image_size=8, patch_size=1, num_channels=1, num_channels_out=1, embed_dim=H, depths=[1], num_heads=[2], window_size=2, mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect", resi_connection="1conv"), pix(1, 8)),
 "swin2sr_pixelshuffle": lambda: (tf.Swin2SRConfig(image_size=8, patch_size=1, num_channels=1, num_channels_out=1, embed_dim=H, depths=[1], num_heads=[2], window_size=2, mlp_ratio=2.0, upscale=2, upsampler="pixelshuffle", resi_connection="1conv"), pix(1, 8)),
 "dinov2_with_registers": lambda: (tf.Dinov2WithRegistersConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=8, patch_size=4, num_channels=1, num_register_tokens=2), pix(1, 8)),
 "dinov3_vit": lambda: (tf.DINOv3ViTConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1, num_register_tokens=2), pix(1, 8)),
 "dinov3_convnext": lambda: (tf.DINOv3ConvNextConfig(num_channels=1, hidden_sizes=[H], depths=[1], image_size=8), pix(1, 8)),
 "hiera": lambda: (tf.HieraConfig(embed_dim=4, image_size=[16, 16], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], mlp_ratio=2.0, depths=[1, 1], num_heads=[2, 2], num_query_pool=1, query_stride=[2, 2], masked_unit_size=[4, 4], masked_unit_attention=[True, False], num_channels=1), pix(1, 16)),
 "vitdet": lambda: (tf.VitDetConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=8, pretrain_image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "ijepa": lambda: (tf.IJepaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "pvt_v2": lambda: (tf.PvtV2Config(image_size=8, num_channels=1, num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[H], patch_sizes=[3], strides=[2], num_attention_heads=[2], mlp_ratios=[2]), pix(1, 8)),
 "mobilenet_v1": lambda: (tf.MobileNetV1Config(num_channels=1, image_size=16, depth_multiplier=0.015625, min_depth=2), pix(1, 16)),
 "mobilevitv2": lambda: (tf.MobileViTV2Config(num_channels=1, image_size=64, width_multiplier=0.0625, n_attn_blocks=[1, 1, 1], base_attn_unit_dims=[8, 8, 8], ffn_multiplier=2), pix(1, 64)),
 "hgnet_v2": lambda: (tf.HGNetV2Config(num_channels=1, embedding_size=4, depths=[1], hidden_sizes=[8], stem_channels=[1, 4, 4], stem_strides=[2, 1, 1, 2, 1], stage_in_channels=[4], stage_mid_channels=[4], stage_out_channels=[8], stage_num_blocks=[1], stage_downsample=[False], stage_downsample_strides=[2], stage_light_block=[False], stage_kernel_size=[3], stage_numb_of_layers=[2], out_features=["stage1"]), pix(1, 16)),
 "textnet": lambda: (tf.TextNetConfig(stem_num_channels=1, stem_out_channels=4, hidden_sizes=[4, 8], conv_layer_kernel_sizes=[[[3, 3], [1, 3]]], conv_layer_strides=[[1, 2]], depths=[2], image_size=[16, 16], out_features=["stage1"]), pix(1, 16)),
 "swiftformer": lambda: (tf.SwiftFormerConfig(num_channels=1, image_size=16, depths=[1, 1, 1, 1], embed_dims=[4, 4, 4, 8], mlp_ratio=2, downsamples=[True, True, True, True]), pix(1, 16)),
 "glpn": lambda: (tf.GLPNConfig(num_channels=1, num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[H], patch_sizes=[3], strides=[2], num_attention_heads=[2], mlp_ratios=[2], decoder_hidden_size=H), pix(1, 8)),
 "data2vec_vision": lambda: (tf.Data2VecVisionConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "vit_msn": lambda: (tf.ViTMSNConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4, num_channels=1), pix(1, 8)),
 "aimv2_vision": lambda: (tf.Aimv2VisionConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_channels=1, image_size=8, patch_size=4), pix(1, 8)),
 "siglip2_vision": lambda: (tf.Siglip2VisionConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_channels=1, patch_size=4, num_patches=4), {"pixel_values": torch.randn(2, 4, 16, dtype=F64, generator=torch.Generator().manual_seed(0)), "pixel_attention_mask": torch.ones(2, 4, dtype=torch.long), "spatial_shapes": torch.tensor([[2, 2], [2, 2]])}),
 # added by the ninth sweep: audio
 "ast": lambda: (tf.ASTConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, patch_size=4, frequency_stride=4, time_stride=4, max_length=8, num_mel_bins=8), {"input_values": torch.randn(2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "wav2vec2_conformer": lambda: (tf.Wav2Vec2ConformerConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, conv_depthwise_kernel_size=3, max_source_positions=P, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "wav2vec2_bert": lambda: (tf.Wav2Vec2BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, feature_projection_input_dim=8, conv_depthwise_kernel_size=3, left_max_position_embeddings=4, right_max_position_embeddings=2, max_source_positions=P, vocab_size=V, mask_time_prob=0.0), {"input_features": torch.randn(2, 6, 8, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "sew_d": lambda: (tf.SEWDConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, squeeze_factor=2, max_position_embeddings=P, position_buckets=4, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 48, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "unispeech_sat": lambda: (tf.UniSpeechSatConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, conv_dim=(4, 4), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=V, mask_time_prob=0.0, feat_extract_norm="group"), {"input_values": torch.randn(2, 24, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "encodec": lambda: (tf.EncodecConfig(hidden_size=8, num_filters=2, num_residual_layers=1, upsampling_ratios=[2, 2], codebook_size=4, codebook_dim=8, num_lstm_layers=1, kernel_size=3, last_kernel_size=3, residual_kernel_size=3, target_bandwidths=[1.5], sampling_rate=16), {"input_values": torch.randn(2, 1, 32, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "dac": lambda: (tf.DacConfig(encoder_hidden_size=2, downsampling_ratios=[2, 2], decoder_hidden_size=8, n_codebooks=1, codebook_size=4, codebook_dim=2, upsampling_ratios=[2, 2], hidden_size=8, hop_length=4), {"input_values": torch.randn(2, 1, 32, dtype=F64, generator=torch.Generator().manual_seed(0))}),
 "univnet": lambda: (tf.UnivNetConfig(model_in_channels=4, model_hidden_channels=4, num_mel_bins=4, resblock_kernel_sizes=[3], resblock_stride_sizes=[2], resblock_dilation_sizes=[[1]], kernel_predictor_num_blocks=1, kernel_predictor_hidden_channels=4), {"input_features": torch.randn(2, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(0)), "noise_sequence": torch.randn(2, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(1))}),
 "moonshine": lambda: (tf.MoonshineConfig(vocab_size=V, hidden_size=H, intermediate_size=I, encoder_num_hidden_layers=1, decoder_num_hidden_layers=1, encoder_num_attention_heads=2, decoder_num_attention_heads=2, encoder_num_key_value_heads=2, decoder_num_key_value_heads=2, max_position_embeddings=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), {"input_values": torch.randn(2, 2000, dtype=F64, generator=torch.Generator().manual_seed(0)), "decoder_input_ids": torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(1))}),
 # added by the ninth sweep: newest text LLMs
 "afmoe": lambda: (tf.AfmoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=2, num_dense_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_experts=2, num_experts_per_tok=1, num_shared_experts=1, global_attn_every_n_layers=2, sliding_window=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "bamba": lambda: (tf.BambaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_chunk_size=8, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "granitemoehybrid": lambda: (tf.GraniteMoeHybridConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=8, layer_types=["mamba", "attention"], mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_chunk_size=8, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "granitemoeshared": lambda: (tf.GraniteMoeSharedConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=8, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "phimoe": lambda: (tf.PhimoeConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=2, router_jitter_noise=0.0, input_jitter_noise=0.0, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "exaone_moe": lambda: (tf.ExaoneMoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_experts=2, num_experts_per_tok=1, num_shared_experts=1, first_k_dense_replace=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "jais2": lambda: (tf.Jais2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "olmo_hybrid": lambda: (tf.OlmoHybridConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=4, linear_conv_kernel_dim=2, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "glm4_moe_lite": lambda: (tf.Glm4MoeLiteConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=2, num_experts_per_tok=1, kv_lora_rank=4, q_lora_rank=4, qk_rope_head_dim=2, v_head_dim=4, qk_nope_head_dim=2, mlp_layer_types=["sparse"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "minimax_m2": lambda: (tf.MiniMaxM2Config(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_local_experts=2, num_experts_per_tok=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "cohere2_moe": lambda: (tf.Cohere2MoeConfig(hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, num_experts=2, num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention"], mlp_layer_types=["sparse"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "gemma4_text": lambda: (tf.Gemma4TextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, vocab_size_per_layer_input=V, hidden_size_per_layer_input=4, max_position_embeddings=P, sliding_window=4, layer_types=["full_attention"], per_layer_config={}, pad_token_id=0), ids()),
 "qwen3_5_text": lambda: (tf.Qwen3_5TextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4, linear_conv_kernel_dim=2, linear_key_head_dim=4, linear_value_head_dim=4, linear_num_key_heads=2, linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "lfm3": lambda: (tf.Lfm3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=4, conv_L_cache=2, sliding_window=4, layer_types=["conv", "full_attention"], vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 # added by the ninth sweep: text encoders
 "fnet": lambda: (tf.FNetConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, vocab_size=V, max_position_embeddings=P, pad_token_id=0), ids()),
 "roc_bert": lambda: (tf.RoCBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P, pronunciation_embed_dim=4, pronunciation_vocab_size=V, shape_embed_dim=4, shape_vocab_size=V), dict(ids(), input_shape_ids=ids()["input_ids"].flip(-1), input_pronunciation_ids=ids()["input_ids"].roll(1, -1))),
 "xmod": lambda: (tf.XmodConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P+2, languages=["en_XX"], default_language="en_XX"), ids()),
 "nomic_bert": lambda: (tf.NomicBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P), ids()),
 "eurobert": lambda: (tf.EuroBertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4, vocab_size=V, max_position_embeddings=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3), ids()),
 "roberta_prelayernorm": lambda: (tf.RobertaPreLayerNormConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, max_position_embeddings=P+2), ids()),
 "openai_gpt": lambda: (tf.OpenAIGPTConfig(n_embd=H, n_layer=1, n_head=2, vocab_size=V, n_positions=P), ids()),
 "imagegpt": lambda: (tf.ImageGPTConfig(n_embd=H, n_layer=1, n_head=2, n_inner=I, vocab_size=V + 1, n_positions=P), ids()),
}
CLASSES = {"swin2sr": tf.Swin2SRForImageSuperResolution, "swin2sr_pixelshuffle": tf.Swin2SRForImageSuperResolution}  # the head that holds the pixel-shuffle upsampler (Swin2SRModel has none)
MAX_S = float(os.environ.get("HF_SWEEP_MAX_SECONDS", os.environ.get("SWEEP_MAX_SECONDS", 240)))  # budget of the count
MAX_D = int(os.environ.get("HF_SWEEP_MAX_D", 5000))  # larger models: no count (analyze says so)
def build(name, impl="eager"):
    cfg, x = BUILDERS[name]()
    for a in ("dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout_rate", "activation_dropout", "resid_dropout", "embed_dropout"):
        if hasattr(cfg, a): 
            try: setattr(cfg, a, 0.0)
            except Exception: pass
    cfg._attn_implementation = impl
    if name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "dbrx", "deepseek_v3", "jamba",
                "deepseek_v2", "dots1", "ernie4_5_moe", "flex_olmo", "glm4_moe", "gpt_oss", "hunyuan_v1_moe", "lfm2_moe", "minimax", "qwen3_next", "kimi_linear", "longcat_flash",
                "afmoe", "granitemoehybrid", "granitemoeshared", "phimoe", "exaone_moe", "glm4_moe_lite", "minimax_m2", "cohere2_moe"):  # torch._grouped_mm has no float64 kernel: the experts' loop
        cfg._experts_implementation = "eager"
    if name == "xglm":  # XGLM's eager mask fills torch.full((), finfo(float64).min) in the default dtype (overflows in float32)
        torch.set_default_dtype(F64)
    if name == "t5enc": m = tf.T5EncoderModel(cfg)
    elif name == "t5": m = tf.T5Model(cfg)
    elif name == "funnel": m = tf.FunnelModel(cfg)  # AutoModel needs config.architectures for funnel
    elif name in ("bart", "marian"): m = (tf.BartModel if name == "bart" else tf.MarianModel)(cfg)
    elif name == "clipvision": m = tf.CLIPVisionModel(cfg)
    elif name == "whisperenc": m = tf.WhisperModel(cfg).get_encoder()
    elif name in CLASSES: m = CLASSES[name](cfg)
    else: m = tf.AutoModel.from_config(cfg)
    m = m.to(F64).eval()
    return m, x


def monitor_only(names: list[str], float32: bool) -> None:
    import torch_conslaw as tc

    out = {}
    for name in sorted(names, key=lambda n: n == "xglm"):  # XGLM changes the default dtype: last
        m, x = build(name)
        if float32:  # the input too (Whisper's features: a float64 input into a float32 convolution raises)
            x = {k: (v.float() if v.is_floating_point() else v) for k, v in x.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = tc.ConservationMonitor(m.float() if float32 else m, x)
            out[name] = sum(g.count for g in mon.groups)
        # laws proposed but refused by the monitor's own numerical check (not false claims, but they cost time)
        refused = [str(s) for s in mon.skipped if "fails the numerical check" in str(s)]
        print(name, out[name], flush=True)
        if refused:
            print("REFUSED", json.dumps({name: [r[:400] for r in refused]}), flush=True)
    print("MONITOR", json.dumps(out))


def main() -> None:
    import torch_conslaw as tc

    if sys.argv[1] == "--monitor":
        float32 = sys.argv[2] == "--float32"
        return monitor_only(sys.argv[3:] if float32 else sys.argv[2:], float32)
    name = sys.argv[1]; impl = sys.argv[2] if len(sys.argv) > 2 else "eager"
    m, x = build(name, impl)
    D = sum(p.numel() for p in m.parameters() if p.requires_grad)
    res = {"name": name, "D": D}
    t = time.time()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = tc.analyze(m, x, theta="random", max_lie_parameters=min(D + 1, MAX_D), max_seconds=MAX_S)
        print(r)
        for ww in {str(ww.message)[:300] for ww in w}: print("WARN analyze:", ww)
        res.update(tracked=r.tracked_rank, lie=r.lie_laws, complete=r.complete, missing=r.missing_laws)
        if r.missing is not None:
            res["shares"] = {k: round(v, 3) for k, v in r.missing.shares.items() if v >= 0.01}
    except Exception:
        traceback.print_exc(); res["error"] = traceback.format_exc().splitlines()[-1]
    res["t_analyze"] = round(time.time() - t, 1)
    t = time.time()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mon = tc.ConservationMonitor(m, x)
        print("MONITOR groups:", [(g.name, g.kind, g.count) for g in mon.groups][:60])
        for ww in w: print("WARN monitor:", str(ww.message)[:300])
        res["monitor_groups"] = len(mon.groups); res["monitor_laws"] = sum(g.count for g in mon.groups)
    except Exception:
        traceback.print_exc(); res["mon_error"] = traceback.format_exc().splitlines()[-1]
    res["t_monitor"] = round(time.time() - t, 1)
    print("RESULT", json.dumps(res))


if __name__ == "__main__":
    main()
