"""Fine-tuning BLIP-2's Q-Former for captioning with the transformers Trainer, as Trainer scripts do: a
datasets.Dataset with an on-the-fly processor transform, the vision encoder and the language model frozen,
then the model saved with save_model.

    python trainer_finetune.py CHECKPOINT IMAGE OUTPUT_DIR
"""

import sys

from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image
from transformers import Trainer, TrainingArguments
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model_id, img_path, output_dir = sys.argv[1], sys.argv[2], sys.argv[3]
processor = Blip2Processor.from_pretrained(model_id)
model = Blip2ForConditionalGeneration.from_pretrained(model_id)

for name, param in model.named_parameters():  # train the Q-Former and the projection only
    param.requires_grad = name.startswith(("qformer", "query_tokens", "language_projection"))

image = Image.open(img_path).convert("RGB")
texts = ["a dog on the grass", "a dog lying down", "the sky above a field", "a dog and a ball", "two dogs", "a ball"]
dataset = Dataset.from_dict({"image": [image.rotate(30 * i) for i in range(len(texts))], "text": texts},
                            features=Features({"image": ImageFeature(), "text": Value("string")}))


def transforms(batch):
    inputs = processor(images=batch["image"], text=batch["text"], padding="max_length", max_length=16,
                       truncation=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


dataset.set_transform(transforms)

training_args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=4,
                                  learning_rate=1e-3, logging_steps=1, remove_unused_columns=False, report_to=[],
                                  save_strategy="no", use_cpu=True, seed=42, dataloader_num_workers=0)
trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
trainer.train()
trainer.save_model(output_dir)

losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(losses)
