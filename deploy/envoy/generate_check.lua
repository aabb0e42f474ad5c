-- The front door's check of a JSON body for the gpt2 model's generate endpoints
-- (/v2/models/gpt2[/versions/N]/generate and generate_stream), before Triton parses it.
--
-- Triton 2.51's JSON parser wraps an integer its input's type cannot hold round to another
-- value (max_tokens 4294967299 arrives as 3, top_k 2^32 as 0: the model cannot tell), answers
-- 500 for a value of the wrong JSON type, and serves "stream": true on /generate by running
-- the whole generation and answering 200 with an error. Each of those is a 400 here, naming
-- the input. Only the body's top-level members are read; a body this scanner does not follow
-- (not an object, an escaped key) goes on as it came, for Triton to judge.
--
-- front_door.py puts in front of this file: INPUT_TYPES (gpt2 input -> Triton datatype),
-- MODEL (the model's name) and REFUSED_HEADER (the request header that keeps the front
-- door's local-reply mappers off this reply's words).

local INTEGER_RANGES = {
  INT32 = { "-2147483648", "2147483647" },
  UINT64 = { "0", "18446744073709551615" },
}

-- what Triton's parser reads as numbers too (the model then names the value it refuses)
local NON_FINITE = { NaN = true, Infinity = true, ["-Infinity"] = true }

-- "123" <= "456" as integers (no sign): by length, then digit by digit
local function digits_at_most(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a <= b
end

local function integer_in(raw, datatype)
  local sign, digits = raw:match("^(-?)(%d+)$")
  if not digits then
    return false
  end
  digits = digits:gsub("^0+(%d)", "%1")
  local low, high = INTEGER_RANGES[datatype][1], INTEGER_RANGES[datatype][2]
  if sign == "-" then
    return digits == "0" or (low:sub(1, 1) == "-" and digits_at_most(digits, low:sub(2)))
  end
  return digits_at_most(digits, high)
end

-- The top-level members of a JSON object: key -> {kind, raw} (raw: a literal's text), or nil
-- where the text is not an object this scanner follows.
local function members_of(body)
  local i, n = 1, #body
  local function skip_space()
    i = body:find("[^ \t\r\n]", i) or n + 1
  end
  local function read_string() -- at the opening quote; nil if it never closes
    local j = i + 1
    while true do
      local at = body:find('["\\]', j)
      if not at then
        return nil
      end
      if body:sub(at, at) == '"' then
        local text = body:sub(i + 1, at - 1)
        i = at + 1
        return text
      end
      j = at + 2
    end
  end
  local function read_value()
    skip_space()
    local first = body:sub(i, i)
    if first == '"' then
      local text = read_string()
      return text and "string", text
    end
    if first == "{" or first == "[" then
      local depth = 0
      while i <= n do
        local c = body:sub(i, i)
        if c == '"' then
          if not read_string() then
            return nil
          end
        else
          if c == "{" or c == "[" then
            depth = depth + 1
          elseif c == "}" or c == "]" then
            depth = depth - 1
          end
          i = i + 1
          if depth == 0 then
            return first == "{" and "object" or "array"
          end
        end
      end
      return nil
    end
    local stop = body:find("[,}%] \t\r\n]", i) or n + 1
    local raw = body:sub(i, stop - 1)
    i = stop
    if raw == "" then
      return nil
    end
    return "literal", raw
  end

  local function at(c) -- the next character past spaces is c
    skip_space()
    return body:sub(i, i) == c
  end

  if not at("{") then
    return nil
  end
  i = i + 1
  local members = {}
  if at("}") then
    return members
  end
  while true do
    local key = at('"') and read_string()
    if not key or key:find("\\", 1, true) or not at(":") then
      return nil
    end
    i = i + 1
    local kind, raw = read_value()
    if not kind then
      return nil
    end
    members[key] = { kind, raw }
    skip_space()
    local c = body:sub(i, i)
    i = i + 1
    if c == "}" then
      return members
    end
    if c ~= "," then
      return nil
    end
  end
end

-- What is wrong with one member, or nil
local function problem(name, kind, raw)
  local datatype = INPUT_TYPES[name]
  if name == "text_input" then -- (a list of them is Triton's to judge, as below)
    if kind == "literal" or kind == "object" then
      return "text_input must be a string, got " .. (raw or "an object")
    end
    return nil
  end
  if not datatype or kind == "array" then -- arrays: Triton's to shape-check
    return nil
  end
  if datatype == "BOOL" then
    if kind ~= "literal" or (raw ~= "true" and raw ~= "false") then
      return name .. " must be true or false"
    end
  elseif INTEGER_RANGES[datatype] then
    local range = INTEGER_RANGES[datatype]
    if kind ~= "literal" or not integer_in(raw, datatype) then
      return name .. " must be an integer in [" .. range[1] .. ", " .. range[2] .. "] ("
        .. datatype .. "), got " .. (kind == "literal" and raw or "a " .. kind)
    end
  elseif kind ~= "literal" or not (tonumber(raw) or NON_FINITE[raw]) then
    return name .. " must be a number, got " .. (kind == "literal" and raw or "a " .. kind)
  end
  return nil
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path") or ""
  path = path:gsub("%?.*$", "")
  local rest = path:match("^/v2/models/([^/]+)/") and path:sub(#("/v2/models/") + 1)
  if not rest then
    return
  end
  local model, endpoint = rest:match("^([^/]+)/generate(.*)$")
  if not model then
    model, endpoint = rest:match("^([^/]+)/versions/%d+/generate(.*)$")
  end
  if model ~= MODEL or (endpoint ~= "" and endpoint ~= "_stream") then
    return
  end
  if handle:headers():get(":method") ~= "POST" then
    return
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  local members = members_of(text)
  local why = nil
  if not text:find("^[ \t\r\n]*{") then
    why = 'the body must be a JSON object: {"text_input": "...", "max_tokens": 64, ...}'
  elseif not members then
    return -- an object this scanner does not follow: Triton judges it
  end
  local names = {}
  for name in pairs(members or {}) do
    names[#names + 1] = name
  end
  table.sort(names) -- the same body, the same message
  for _, name in ipairs(names) do
    why = problem(name, members[name][1], members[name][2])
    if why then
      break
    end
  end
  local stream = members and members["stream"]
  if not why and endpoint == "" and stream and stream[2] == "true" then
    why = "stream: true asks for one response a piece of text: POST to "
      .. path .. "_stream instead (or use gRPC); /generate sends one response"
  end
  if why then
    handle:headers():add(REFUSED_HEADER, "1")
    handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, why)
  end
end
