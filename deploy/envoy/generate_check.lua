-- The front door's check of a JSON body for the gpt2 model's generate endpoints
-- (/v2/models/gpt2[/versions/N]/generate and generate_stream), before Triton parses it.
--
-- Triton 2.51's JSON parser wraps an integer its input's type cannot hold round to another
-- value (max_tokens 4294967299 arrives as 3, top_k 2^32 as 0: the model cannot tell), answers
-- 500 for a value of the wrong JSON type, and serves "stream": true on /generate by running
-- the whole generation and answering 200 with an error. Each of those is a 400 here, naming
-- the input, as is a name given twice (which of them Triton would read is its own choice).
-- The body's top-level members are read, and the elements of a list (a batch of one, to
-- Triton, which flattens nested lists: more than 32 levels are refused). A body this
-- scanner does not follow to its end (it is not valid JSON) goes on as it came, for
-- Triton's parser to judge; a failure of the check itself refuses the body.
--
-- It runs on the route that sends requests on to Triton (envoy.yaml.in: LuaPerRoute), so a
-- request refused by an earlier route (no API key, a compressed body) never reaches it.
-- front_door.py puts in front of this file: INPUT_TYPES (gpt2 input -> Triton datatype),
-- INTEGER_RANGES (datatype -> {low, high}, as decimal strings) and MODEL (the model's name). Its refusals set the dynamic metadata
-- gpt2.generate_check.refused, which keeps the local-reply mappers off their words.

-- Triton flattens nested lists to their values; deeper than this is refused (and keeps the
-- scanner, which reads a list by recursion, far from Lua's stack limit)
local MAX_LIST_DEPTH = 32

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

-- A JSON string's escapes undone, as far as a field name can use them (ASCII)
local ESCAPED = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- A JSON string's escapes undone, as far as a field name can use them (ASCII)
local function unescaped(text)
  if not text:find("\\", 1, true) then
    return text
  end
  local out, at = {}, 1
  while at <= #text do
    local c = text:sub(at, at)
    if c ~= "\\" then
      out[#out + 1] = c
      at = at + 1
    elseif text:sub(at + 1, at + 1) == "u" then
      local hex = text:sub(at + 2, at + 5)
      local code = hex:match("^%x%x%x%x$") and tonumber(hex, 16)
      out[#out + 1] = (code and code < 128) and string.char(code) or text:sub(at, at + 5)
      at = at + 6
    else
      local e = text:sub(at + 1, at + 1)
      out[#out + 1] = ESCAPED[e] or e
      at = at + 2
    end
  end
  return table.concat(out)
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
  local at -- below
  local function read_value(depth)
    skip_space()
    local first = body:sub(i, i)
    if first == '"' then
      local text = read_string()
      return text and "string", text
    end
    if first == "[" then -- its elements: {kind, raw} each
      if depth > MAX_LIST_DEPTH then -- Triton would flatten it: a value all the same
        error("lists nested more than " .. MAX_LIST_DEPTH .. " deep", 0)
      end
      i = i + 1
      local elements = {}
      if at("]") then
        i = i + 1
        return "array", elements
      end
      while true do
        local kind, raw = read_value(depth + 1)
        if not kind then
          return nil
        end
        elements[#elements + 1] = { kind, raw }
        if at("]") then
          i = i + 1
          return "array", elements
        end
        if not at(",") then
          return nil
        end
        i = i + 1
      end
    end
    if first == "{" then
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
            return "object"
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

  at = function(c) -- the next character past spaces is c
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
    if not key or not at(":") then
      return nil
    end
    key = unescaped(key)
    i = i + 1
    local kind, raw = read_value(1)
    if not kind then
      return nil
    end
    if members[key] then
      return members, key -- given twice
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

-- What is wrong with one value of an input, or nil
local function problem(name, kind, raw)
  local datatype = INPUT_TYPES[name]
  if kind == "array" then -- a batch (of one, for gpt2): each element as a value
    for _, element in ipairs(raw) do
      local why = problem(name, element[1], element[2])
      if why then
        return why
      end
    end
    return nil
  end
  if name == "text_input" then
    if kind ~= "string" then
      return "text_input must be a string, got " .. (raw or "an object")
    end
    return nil
  end
  if not datatype then -- stop_words, or a name Triton and the model judge
    return nil
  end
  local got = kind == "literal" and raw or "a " .. kind
  if datatype == "BOOL" then
    if kind ~= "literal" or (raw ~= "true" and raw ~= "false") then
      return name .. " must be true or false, got " .. got
    end
  elseif INTEGER_RANGES[datatype] then
    local range = INTEGER_RANGES[datatype]
    if kind ~= "literal" or not integer_in(raw, datatype) then
      return name .. " must be an integer in [" .. range[1] .. ", " .. range[2] .. "] ("
        .. datatype .. "), got " .. got
    end
  elseif kind ~= "literal" or not (tonumber(raw) or NON_FINITE[raw]) then
    return name .. " must be a number, got " .. got
  end
  return nil
end

-- What is wrong with a generate body, or nil; nil too for one Triton's parser should judge
local function body_problem(text, endpoint, path)
  if not text:find("^[ \t\r\n]*{") then
    return 'the body must be a JSON object: {"text_input": "...", "max_tokens": 64, ...}'
  end
  local members, twice = members_of(text)
  if not members then
    return nil -- not JSON this scanner can follow to its end: Triton's parser says why
  end
  if twice then
    return twice .. " is given more than once"
  end
  local names = {}
  for name in pairs(members) do
    names[#names + 1] = name
  end
  table.sort(names) -- the same body, the same message
  for _, name in ipairs(names) do
    local why = problem(name, members[name][1], members[name][2])
    if why then
      return why
    end
  end
  -- a list (of lists...) of one: Triton reads its first value
  local kind, raw = nil, nil
  if members["stream"] then
    kind, raw = members["stream"][1], members["stream"][2]
    while kind == "array" and raw[1] do
      kind, raw = raw[1][1], raw[1][2]
    end
  end
  if endpoint == "" and kind == "literal" and raw == "true" then
    return "stream: true asks for one response a piece of text: POST to " .. path
      .. "_stream instead (or use gRPC); /generate sends one response"
  end
  return nil
end

function envoy_on_request(handle)
  local path = (handle:headers():get(":path") or ""):gsub("%?.*$", "")
  local rest = path:match("^/v2/models/(.*)$")
  if not rest or handle:headers():get(":method") ~= "POST" then
    return
  end
  local model, endpoint = rest:match("^([^/]+)/generate(.*)$")
  if not model then
    model, endpoint = rest:match("^([^/]+)/versions/%d+/generate(.*)$")
  end
  if model ~= MODEL or (endpoint ~= "" and endpoint ~= "_stream") then
    return
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  -- a failure of the check itself refuses the body: never a body let through unread
  local read, why = pcall(body_problem, text, endpoint, path)
  if not read then
    why = "the front door could not read this body: " .. tostring(why)
  end
  if why then
    handle:streamInfo():dynamicMetadata():set("gpt2.generate_check", "refused", true)
    handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, why)
  end
end
