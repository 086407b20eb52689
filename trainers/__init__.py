from .contrastive import ContrastiveTrainer, ContrastiveTrainingArguments  # noqa: F401
from .mola import MolaTrainer, MolaTrainingArguments  # noqa: F401
