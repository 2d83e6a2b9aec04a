"""PickScore v1 on transformers."""

import torch


class PickScore:
    """PickScore: `logit_scale.exp() * cosine(image embedding, prompt embedding)` of the PickScore CLIP-H model.

    Reproduces the PickScore model card recipe (yuvalkirstain/PickScore_v1): `AutoProcessor` of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K (images; text with padding, truncation, max_length=77),
    `get_image_features` / `get_text_features`, L2 normalisation, `model.logit_scale.exp() * text @ image.T`;
    here each image is scored against its own prompt. The image processor is pinned to transformers' PIL backend
    (the CLIPImageProcessor the recipe was published with), so scores do not depend on whether torchvision is
    installed. Proven by tests/test_scorers_clip.py::test_pickscore_matches_reference: a tiny CLIPModel folder +
    processor folder scored by the model card recipe (tests/golden/make_clip_goldens.py) agrees to 1e-4.

    `model` and `processor`: Hub ids or local folders (`from_pretrained`).
    """

    MODEL = "yuvalkirstain/PickScore_v1"
    PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, model=MODEL, processor=PROCESSOR, device="cpu", dtype=torch.float32, batch_size=16):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.image_processor = AutoImageProcessor.from_pretrained(processor, backend="pil")
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def score(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.image_processor(images=list(images[i : i + self.batch_size]), return_tensors="pt")[
                "pixel_values"
            ]
            text = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            )
            img = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            txt = self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
            )
            img = getattr(img, "pooler_output", img).float()
            txt = getattr(txt, "pooler_output", txt).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            scores += (self.model.logit_scale.float().exp() * (img * txt).sum(-1)).tolist()
        return scores
