import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "model_configs"

sys.path.insert(0, str(Path(__file__).resolve().parent))
FIXTURES = REPO / "tests" / "fixtures"
