"""The tiny pixel-space models that the pixel-space, super-resolution and cascade tests share: a
16 px base model and a 16 -> 32 px super-resolution model (two steps each)."""

BASE = ["task=text2image", "data=shapes", "image_size=16", "data_size=64", "batch_size=4", "precision=fp32",
        "model=TINY", 'text_encoder={"width": 32, "layers": 2, "heads": 2}', "prediction=v",
        "schedule=scaled_linear", "warmup_steps=1", "log_every=1", "sample_steps=2", "sample_every=1000",
        "lr=0.001", "vae_model=pixel"]
SR = [a.replace("image_size=16", "image_size=32") for a in BASE] + ["low_res=16"]
