#include "tools/commands.h"
