from peft_lightning.data.datamodule import MultiTaskDataModule
from peft_lightning.data.readers import DataError, read_split
from peft_lightning.data.schedules import SCHEDULES, ScheduleSampler

__all__ = ["SCHEDULES", "DataError", "MultiTaskDataModule", "ScheduleSampler", "read_split"]
