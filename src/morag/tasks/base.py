"""The seed's import surface: ``ProcessingTask`` and the four processing tasks.

Each task is defined in its modality's module, so its name
(``morag.tasks.<kind>_tasks.…``) matches its route and it lands on its own queue.
"""

from morag.tasks.audio_tasks import process_audio_task
from morag.tasks.document_tasks import process_document_task
from morag.tasks.processing import ProcessingTask
from morag.tasks.video_tasks import process_video_task
from morag.tasks.web_tasks import process_web_task

__all__ = [
    "ProcessingTask",
    "process_audio_task",
    "process_document_task",
    "process_video_task",
    "process_web_task",
]
