"""Real upstream error bodies, as the providers send them (ids and key fragments redacted).

Sources: the providers' error docs and public bug reports quoting raw responses.
"""

from __future__ import annotations

# OpenAI 401: the message echoes a masked key, so it must never reach a reason.
OPENAI_INVALID_API_KEY = (
    b'{"error":{"message":"Incorrect API key provided: sk-VKMIs***************************************wjh3. '
    b'You can find your API key at https://platform.openai.com/account/api-keys.",'
    b'"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
)
OPENAI_RATE_LIMIT_EXCEEDED = (
    b'{"error":{"message":"Rate limit reached for gpt-4o in organization org-XXXXXXXXXXXXXXXXXXXXXXXX on tokens per '
    b"min (TPM): Limit 30000, Used 14567, Requested 24754. Please try again in 18.642s. Visit "
    b'https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,'
    b'"code":"rate_limit_exceeded"}}'
)
OPENAI_INSUFFICIENT_QUOTA = b"""{
  "error": {
    "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "type": "insufficient_quota",
    "param": null,
    "code": "insufficient_quota"
  }
}"""  # noqa: E501
OPENAI_CONTEXT_LENGTH_EXCEEDED = (
    b'{"error":{"message":"This model\'s maximum context length is 4097 tokens. However, your messages resulted '
    b'in 4294 tokens. Please reduce the length of the messages.","type":"invalid_request_error",'
    b'"param":"messages","code":"context_length_exceeded"}}'
)

ANTHROPIC_AUTHENTICATION_ERROR = (
    b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
)
ANTHROPIC_RATE_LIMIT_ERROR = (
    b'{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your account\'s rate '
    b'limit. Please try again later."},"request_id":"req_011CYwBRWF1xNRNtAVSzDAfR"}'
)
ANTHROPIC_OVERLOADED_ERROR = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
ANTHROPIC_PROMPT_TOO_LONG = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208656 tokens > '
    b'200000 maximum"},"request_id":"req_011CWdepJvA2D819tdYYq4h7"}'
)
ANTHROPIC_NOT_FOUND = (
    b'{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."}}'
)

GEMINI_API_KEY_INVALID = b"""{
  "error": {
    "code": 400,
    "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {
          "service": "generativelanguage.googleapis.com"
        }
      },
      {
        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
        "locale": "en-US",
        "message": "API key not valid. Please pass a valid API key."
      }
    ]
  }
}
"""
GEMINI_API_KEY_NOT_FOUND = b"""{
  "error": {
    "code": 400,
    "message": "API Key not found. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {
          "service": "generativelanguage.googleapis.com"
        }
      }
    ]
  }
}
"""
# Only the ErrorInfo reason identifies the key problem here: the message was localised.
GEMINI_API_KEY_INVALID_REASON_ONLY = (
    b'{"error":{"code":400,"message":"Cl\\u00e9 API non valide.","status":"INVALID_ARGUMENT","details":[{"@type":'
    b'"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}'
)
GEMINI_RESOURCE_EXHAUSTED = b"""{
  "error": {
    "code": 429,
    "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
            "quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            "quotaDimensions": {
              "location": "global",
              "model": "gemini-2.5-flash"
            },
            "quotaValue": "250000"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [
          {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "26s"
      }
    ]
  }
}
"""  # noqa: E501
GEMINI_RESOURCE_EXHAUSTED_SHORT = b"""{
  "error": {
    "code": 429,
    "message": "Resource has been exhausted (e.g. check quota).",
    "status": "RESOURCE_EXHAUSTED"
  }
}
"""
GEMINI_INVALID_ARGUMENT = (
    b'{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified\\n",'
    b'"status":"INVALID_ARGUMENT"}}'
)

AZURE_INVALID_SUBSCRIPTION_KEY = (
    b'{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. '
    b"Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for "
    b'your resource."}}'
)

OPENROUTER_NO_AUTH = b'{"error":{"message":"No auth credentials found","code":401}}'
OPENROUTER_USER_NOT_FOUND = b'{"error":{"message":"User not found.","code":401}}'

# --- Out of credits or quota (class EXHAUSTED) -----------------------------------------------
# Sources: users' reports quoting raw answers (GitHub issues), ids redacted to the same length.
# OpenAI 429 insufficient_quota: OPENAI_INSUFFICIENT_QUOTA above; the older shape had "code": null.
OPENAI_INSUFFICIENT_QUOTA_CODE_NULL = (
    b'{\n    "error": {\n        "message": "You exceeded your current quota, please check your plan and billing '
    b'details.",\n        "type": "insufficient_quota",\n        "param": null,\n        "code": null\n    }\n}'
)
# OpenAI 400 (images, older accounts with a hard limit), as PowerShellAI#127 and acode-plugin-chatgpt#19 quote it.
OPENAI_BILLING_HARD_LIMIT = (
    b'{\n  "error": {\n    "code": "billing_hard_limit_reached",\n    "message": "Billing hard limit has been '
    b'reached",\n    "param": null,\n    "type": "invalid_request_error"\n  }\n}'
)
# Anthropic 400 (claude-code#66314 and many more; request_id since 2025).
ANTHROPIC_CREDIT_BALANCE_TOO_LOW = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access '
    b'the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."},'
    b'"request_id":"req_011CbrFTcXhtiMzr3s6EocF7"}'
)
# Gemini: the message as dyad#3626 quotes it, in Google's error shape (429 RESOURCE_EXHAUSTED).
GEMINI_PREPAYMENT_CREDITS_DEPLETED = (
    b'{\n  "error": {\n    "code": 429,\n    "message": "Your prepayment credits are depleted. Please go to AI Studio '
    b'at https://ai.studio/projects to manage your project and billing.",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n'
)
# Azure AI services gateway 403 (azure-docs#16282, node-bing-api#34): a quota, not a bad key.
AZURE_OUT_OF_CALL_VOLUME_QUOTA = (
    b'{ "statusCode": 403, "message": "Out of call volume quota. Quota will be replenished in 22.14:18:12." }'
)
# Azure OpenAI 429 token rate limit: stays a rate limit (with its Retry-After).
AZURE_TOKEN_RATE_LIMIT = (
    b'{"error":{"code":"429","message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API '
    b"version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
    b"7 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default "
    b'rate limit."}}'
)
# OpenRouter 402 (openclaude#43, open-assistant#80 with metadata, agora#8 with previous_errors).
OPENROUTER_INSUFFICIENT_CREDITS = (
    b'{"error":{"message":"Insufficient credits. This account never purchased credits. Make sure your key is on the '
    b'correct account or org, and if so, purchase more at https://openrouter.ai/settings/credits","code":402}}'
)
OPENROUTER_INSUFFICIENT_CREDITS_METADATA = (
    b'{"error": {"message": "Insufficient credits. Add more using https://openrouter.ai/settings/credits", '
    b'"code": 402, "metadata": {"limit_source": "openrouter_credits", "remedy_hint": "Add credits at '
    b'https://openrouter.ai/settings/credits, or lower max_tokens / prompt size to fit your remaining balance."}}}'
)
OPENROUTER_MORE_CREDITS_FOR_MAX_TOKENS = (
    b'{"error":{"message":"This request requires more credits, or fewer max_tokens. You requested up to 65536 tokens, '
    b"but can only afford 3395. To increase, visit https://openrouter.ai/settings/credits and upgrade to a paid "
    b'account","code":402,"metadata":{"provider_name":null}}}'
)
# Groq: the daily token limit is a 429 rate limit with a wait (continue#10920); no credit wording exists
# (free tier or pay-as-you-go): it stays RATE_LIMITED, honouring Retry-After.
GROQ_TOKENS_PER_DAY = (
    b'{"error":{"message":"Rate limit reached for model `llama-3.3-70b-versatile` in organization '
    b"`org_01kjh7p9n8f1qs6nz2bz77vy6b` service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 97050, "
    b"Requested 3619. Please try again in 9m38.016s. Need more tokens? Upgrade to Dev Tier today at "
    b'https://console.groq.com/settings/billing","type":"tokens","code":"rate_limit_exceeded"}}'
)
# Together 402 (edsl#2098); its 429 rate limit also says type credit_limit (MoA#27): that one is a rate limit.
TOGETHER_CREDIT_LIMIT_EXCEEDED = (
    b'{"id": "o3LiXw4-62bZhn-96040daf687810ab", "error": {"message": "Credit limit exceeded. Please navigate to '
    b'https://api.together.xyz/settings/billing to add credit or upgrade your plan.", "type": "credit_limit", '
    b'"param": null, "code": null}}'
)
TOGETHER_RATE_LIMITED_CREDIT_LIMIT_TYPE = (
    b'{"error": {"message": "You have been rate limited. Your rate limit is 60 queries per minute. Please navigate to '
    b'https://api.together.xyz/settings/billing to upgrade to a paid plan.", "type": "credit_limit", "param": null, '
    b'"code": null}}'
)
# Mistral: its 429s (raycast/extensions#31107, continue#6185) are rate or capacity limits, also when a monthly
# limit is hit; no distinct billing wording was found, so they stay RATE_LIMITED.
MISTRAL_RATE_LIMITED = (
    b'{"object":"error","message":"Rate limit exceeded","type":"rate_limited","param":null,"code":"1300",'
    b'"raw_status_code":429}'
)
MISTRAL_SERVICE_TIER_CAPACITY = (
    b'{"object":"error","message":"Service tier capacity exceeded for this model.","type":"invalid_request_error",'
    b'"param":null,"code":null}'
)
# DeepSeek 402 (Aider#4851; continue#9942 "402 Insufficient Balance").
DEEPSEEK_INSUFFICIENT_BALANCE = (
    b'{"error":{"message":"Insufficient Balance","type":"unknown_error","param":null,"code":"invalid_request_error"}}'
)
# xAI (an OpenAI-compatible provider) answers a bare JSON string (continue#10373).
XAI_CREDITS_USED_UP = (
    b'"Your team 16f2151a-40f4-4a80-8ad0-cae00c27e8dd has either used all available credits or reached its monthly '
    b'spending limit. To continue making API requests, please purchase more credits or raise your spending limit."'
)
