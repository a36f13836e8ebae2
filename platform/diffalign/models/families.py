"""The model families by name, importable without diffusers (the config validates against them)."""

UNET_FAMILIES = ("sd15", "sdxl")
FLOW_FAMILIES = ("sd3", "flux", "qwenimage")  # rectified flow: x_s = (1 - s) x0 + s eps, target eps - x0
FAMILIES = UNET_FAMILIES + FLOW_FAMILIES
# What each flow pipeline's __call__ uses when max_sequence_length is not given.
FLOW_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "qwenimage": 512}
# The pipeline class a diffusers folder of each family names in its model_index.json.
PIPELINE_CLASS_NAMES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                        "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                        "qwenimage": "QwenImagePipeline"}
# The components training loads from a family's pipeline folder, with what each one is.
REQUIRED_COMPONENTS = {
    "sd15": {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP text encoder",
             "tokenizer": "CLIP tokenizer", "scheduler": "noise schedule"},
    "sdxl": {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
             "tokenizer": "CLIP-L tokenizer", "text_encoder_2": "CLIP-G text encoder",
             "tokenizer_2": "CLIP-G tokenizer",
             "scheduler": "noise schedule"},
    "sd3": {"transformer": "MMDiT transformer", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
            "tokenizer": "CLIP-L tokenizer", "text_encoder_2": "CLIP-G text encoder",
            "tokenizer_2": "CLIP-G tokenizer", "scheduler": "flow-matching schedule"},
    "flux": {"transformer": "FLUX transformer", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
             "tokenizer": "CLIP-L tokenizer", "text_encoder_2": "T5 text encoder",
             "tokenizer_2": "T5 tokenizer", "scheduler": "flow-matching schedule"},
    "qwenimage": {"transformer": "Qwen-Image transformer", "vae": "VAE",
                  "text_encoder": "Qwen2.5-VL text encoder", "tokenizer": "Qwen2 tokenizer",
                  "scheduler": "flow-matching schedule"},
}
SD3_T5_COMPONENTS = {"text_encoder_3": "T5 text encoder (set model.t5=false to run without it)",
                     "tokenizer_3": "T5 tokenizer (set model.t5=false to run without it)"}
