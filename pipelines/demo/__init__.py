"""The demo: what the tiny demo configs (`model=qwen_image_tiny`, `model=qwen_image_edit_tiny`,
`lora=tiny_demo`) build and read, offline and in seconds on a CPU. Not test code: it ships.

    qwen_image_tiny.py   the tiny Qwen-Image / Edit-2511 repos (random weights, hub layout), their
                         LoRA, and TinyQwenImagePipeline (small picture areas)
    qwen_image_21_tiny.py  the tiny Qwen-Image 2.1 repo and TinyQwenImage21Pipeline (128x128)
    checkpoints.py       random weights written as the hub's (sharded) safetensors
    lora.py              random LoRAs in every file format the library reads
    controlnet_tiny.py   a tiny random Blockwise ControlNet (DiffSynth's layout) for the tiny DiT, and
                         an edge-map control picture
    tokenizer.py         the real Qwen2.5-VL tokenizer folder, built from BPE ranks on disk
    processor.py         the Edit models' and 2.1's `processor/` folders (tokenizer, image processor
                         config, 2.1's chat template)
    pictures/            the edit demo's two pictures
"""
